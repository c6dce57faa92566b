"""How TransVG trains on SynthRef in the tiny profile: Acc@0.5 per split, wall time and step time on this machine.

    .venv/bin/python benchmarks/train_transvg_tiny.py [--model transvg-tiny] [--n-train 2000] [--n-eval 500]
        [--epochs 3] [--batch-size 32] [--lr 1e-4] [--visual-lr-scale 1.0] [--text-lr-scale 0.1]
        [--visual-zoo resnet-tiny] [--freeze-visual] [--freeze-text] [--no-augment] [--remember]
        [--object-scale 1.0] [--set key=value ...] [--out runs/bench/transvg_tiny]

Trains with the one Trainer (AdamW, warm-up + cosine, BoxCriterion: L1 + GIoU as the release) on SynthRef train and
evaluates on val / testA / testB at the end. The samples are generated once up front (the generation time is
reported apart), so the training time is the model's. `--set` passes overrides to `build(model, ...)`, values
parsed as JSON where they parse ("--set dropout=0.0 --set visual_options={\"return_layer\":\"layer4\"}").
`--visual-zoo NAME` starts the visual backbone from `vgstudy.zoo.pretrained(NAME)` (SynthRef-pretrained, cached;
its pretraining time is reported apart); otherwise it starts from random weights, which is why the default visual lr
scale is 1 where the release's is 0.1. `--remember` (with --no-augment and both backbones frozen) keeps the
transformed items and the frozen backbones' outputs in memory (`vgstudy.models.memo`): each input runs through the
backbones once, in the first epoch.
Writes results.json (the Trainer's, plus the timings) under --out; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from vgstudy.data.synthref import SynthRef
from vgstudy.data.transforms import GroundingTransform, RememberedItems, TransformedDataset, collate
from vgstudy.losses import BoxCriterion
from vgstudy.models import build, describe
from vgstudy.models.memo import BackboneMemo
from vgstudy.seeding import seed_everything
from vgstudy.train import Stage, TrainConfig, Trainer


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transvg-tiny")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--visual-lr-scale", type=float, default=1.0)
    parser.add_argument("--text-lr-scale", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--visual-zoo", default=None, help="zoo name of a pretrained visual backbone")
    parser.add_argument("--zoo-cache", type=Path, default=None, help="the zoo's cache_dir (default: the zoo's)")
    parser.add_argument("--freeze-visual", action="store_true", help="freeze the visual backbone")
    parser.add_argument("--freeze-text", action="store_true", help="freeze the text backbone")
    parser.add_argument("--no-augment", action="store_true", help="train on the eval transform")
    parser.add_argument("--remember", action="store_true", help="remember the frozen backbones' outputs")
    parser.add_argument("--object-scale", type=float, default=1.0, help="SynthRef's object size multiplier")
    parser.add_argument("--set", action="append", default=[], type=parse_override, metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("runs/bench/transvg_tiny"))
    args = parser.parse_args()
    if args.remember and not (args.no_augment and args.freeze_visual and args.freeze_text):
        parser.error("--remember needs --no-augment, --freeze-visual and --freeze-text")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")

    start = time.perf_counter()
    splits = {"train": args.n_train, "val": args.n_eval, "testA": args.n_eval, "testB": args.n_eval}
    data = {
        split: RememberedItems(SynthRef(split, n, seed=args.seed, object_scale=args.object_scale))
        for split, n in splits.items()
    }
    for items in data.values():  # generated up front, so the training time is the model's
        for i in range(len(items)):
            items[i]
    generation_s = time.perf_counter() - start

    zoo_s = 0.0
    overrides = dict(args.set, freeze_visual=args.freeze_visual, freeze_text=args.freeze_text)
    if args.visual_zoo:
        from vgstudy.zoo import pretrained

        zoo_start = time.perf_counter()
        overrides["visual_module"] = pretrained(args.visual_zoo, cache_dir=args.zoo_cache)
        zoo_s = time.perf_counter() - zoo_start
    seed_everything(args.seed)
    model = build(args.model, **overrides)
    train_transform = dataclasses.replace(model.transform, train=not args.no_augment)
    train_set = TransformedDataset(data["train"], GroundingTransform(train_transform))
    if args.remember:
        train_set = RememberedItems(train_set)
        model.remember_frozen_backbones(BackboneMemo())
    eval_transform = GroundingTransform(model.transform)
    eval_sets = {split: TransformedDataset(data[split], eval_transform) for split in ("val", "testA", "testB")}

    lr_scale = {}
    if not args.freeze_visual:
        lr_scale["visual."] = args.visual_lr_scale
    if not args.freeze_text:
        lr_scale["text."] = args.text_lr_scale
    params = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    stage = Stage("train", epochs=args.epochs, lr=args.lr, lr_scale=lr_scale, warmup_steps=args.warmup_steps)
    config = TrainConfig(stages=(stage,), batch_size=args.batch_size, seed=args.seed, eval_every_epochs=0)
    trainer = Trainer(
        model, BoxCriterion(), train_set, config, args.out, collate_fn=collate, eval_sets=eval_sets, params=params
    )
    fit_start = time.perf_counter()
    results = trainer.fit(resume=False)
    fit_s = time.perf_counter() - fit_start

    counts = describe(model)
    timings = {
        "sample_generation_s": generation_s,
        "zoo_pretraining_or_loading_s": zoo_s,
        "fit_wall_s": fit_s,
        "train_time_s": results["train_time_s"],
        "evaluation_s": fit_s - results["train_time_s"],
        "step_time_s": results["train_time_s"] / results["steps"],
        "steps": results["steps"],
        "threads": torch.get_num_threads(),
        "parameters": {"total": counts["total"], "trainable": counts["trainable"]},
    }
    report = {"timings": timings, "results": results}
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    shown = {key: value for key, value in overrides.items() if key != "visual_module"}
    print(
        f"{args.model} {shown} visual from {args.visual_zoo or 'random weights'}: {args.n_train} train samples x "
        f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, lr_scale {lr_scale}, "
        f"{'no augmentation' if args.no_augment else 'augmented'}{', backbones remembered' if args.remember else ''}, "
        f"object scale {args.object_scale:g}"
    )
    print("| split | Acc@0.5 | Acc@0.75 | mIoU |\n|---|---|---|---|")
    for split, metrics in results["metrics"].items():
        print(f"| {split} | {metrics['acc50']:.1f} | {metrics['acc75']:.1f} | {metrics['miou']:.3f} |")
    print(
        f"train {results['train_time_s']:.1f} s ({timings['step_time_s']:.3f} s/step, {timings['steps']} steps), "
        f"evaluation {timings['evaluation_s']:.1f} s, sample generation {generation_s:.1f} s, zoo {zoo_s:.1f} s, "
        f"{torch.get_num_threads()} threads; trainable {counts['trainable']:,} of {counts['total']:,}"
    )
    print(f"written: {args.out / 'benchmark.json'}")


if __name__ == "__main__":
    main()
