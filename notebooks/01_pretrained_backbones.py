# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Pretrained backbones: unimodal and multimodal
#
# Every method of this study starts from pretrained encoders and only *adds* the grounding on top. TransVG takes a
# ResNet + DETR encoder pretrained for **detection** and BERT pretrained on **text** — two unimodal backbones whose
# features know nothing of each other. HiVG starts from **CLIP**, whose image and text towers were trained together so
# that an image and its caption land close. MaPPER freezes DINOv2 and BERT; EpmVG-R distils CLIP into TransVG.
#
# This notebook:
#
# 1. pretrains the small backbones the `tiny`/`study` profiles use (cached under `runs/zoo`, so later notebooks reuse
#    them): a small CLIP (contrastive, image ↔ caption and phrase ↔ region) and a small unimodal ViT (vision-only
#    labels), and shows what each learned;
# 2. shows the multimodal backbone's zero-shot phrase → region similarity maps: grounding signal with no grounding
#    training at all;
# 3. trains TransVG from (a) a random visual backbone, (b) the unimodal one, (c) CLIP's two towers, and compares the
#    accuracy per split with the trivial baselines of notebook 00 and with TransVG's reported numbers.
#
# With the `paper` profile the same cells use the real DETR-R50, BERT-base and CLIP ViT-B/16 weights from local files.

# %% tags=["parameters"]
profile = "tiny"  # tiny | study | paper
seed = 0
device = "cpu"
out_dir = "../runs"  # relative to notebooks/
run_id = None  # default: a timestamp
dataset = "synthref"
data_root = None
image_root = None
image_size = 128
n_train = 640  # SynthRef training samples
n_eval = 100  # samples per evaluation split
variants = "random,unimodal,clip"
epochs = 3
batch_size = 32
lr = 5e-4
backbone_lr_scale = 0.1
freeze_backbones = True
remember_backbones = True
detr_weights = None
bert_weights = None
clip_weights = None

# %%
import json

import matplotlib.pyplot as plt
import torch

import vgstudy
from vgstudy import viz, zoo
from vgstudy.compare import difference, estimate, markdown_table
from vgstudy.config import BackbonesParams
from vgstudy.data import GroundingTransform, SynthRef, TransformConfig
from vgstudy.experiment import baselines, eval_split_names, grounding_data, train_and_evaluate
from vgstudy.models import build, build_backbone, describe
from vgstudy.notebook import run_dir
from vgstudy.papers import reported
from vgstudy.train import Stage

params = vgstudy.config.load(locals(), BackbonesParams)
vgstudy.seed_everything(params.seed)
out = run_dir(params.out_dir, "01_pretrained_backbones", params.run_id)
zoo_profile = "study" if params.profile == "study" else "tiny"
print(params)


# %% [markdown]
# ## 1 · Two kinds of pretraining
#
# Real backbones cannot be downloaded here, so the small profiles pretrain small versions of the same architectures on
# SynthRef, each with the *kind* of objective its full-size model had (`vgstudy.zoo`, below). They train once and are
# cached; a second run of this notebook, and every later notebook, loads them.
#
# - **clip-tiny** (`clip:tiny`, CLIP's architecture, 6 + 6 layers): CLIP's symmetric InfoNCE between each scene and a
#   caption of it, plus a phrase ↔ best-patch term so the patch tokens (what grounding models read) learn too.
# - **vit-tiny** (`dinov2:tiny`, DINOv2's architecture, 6 layers): vision only, multi-label prediction of the shapes
#   and colours present, scored by the best token, plus each token's colour and shape.
#
# The text side of the unimodal pipeline is a real pretrained encoder: the 6-layer MiniLM (`bert:minilm`).

# %%
vgstudy.show_source(zoo.pretrain)

# %%
pretrained = {}
if params.profile != "paper":
    for name in ("clip-tiny", "vit-tiny"):
        pretrained[name] = zoo.pretrained(name, profile=zoo_profile, cache_dir=params.out_dir / "zoo")
    reports = {name: zoo.report(name, profile=zoo_profile, cache_dir=params.out_dir / "zoo") for name in pretrained}

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.2))
    for ax, (name, run) in zip(axes, reports.items(), strict=True):
        curve = run["loss_curve"]
        for key, values in curve.items():
            if key != "step":
                ax.plot(curve["step"], values, label=key)
        ax.set(title=f"{name}: pretraining loss", xlabel="step", yscale="log")
        ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# What each learned, on held-out SynthRef scenes, before and after pretraining and at chance. For clip-tiny:
# caption retrieval top-1 among all held-out scenes (both ways) and *pointing accuracy*, the share of object phrases
# whose best-matching patch lies on that object. For vit-tiny: mean average precision of the scene labels, and the
# per-token colour and shape accuracy on the cells an object covers.

# %%
if params.profile != "paper":
    for name, run in reports.items():
        metrics = run["metrics"]
        keys = [k for k in metrics["after"] if k.endswith(("top1", "accuracy", "_map")) and "loss" not in k]
        rows = []
        for key in keys:
            chance_key = "retrieval_top1" if key.endswith("top1") else key
            chance = metrics["chance"].get(chance_key)
            rows.append(
                [
                    key,
                    f"{metrics['before'][key]:.2f}",
                    f"{metrics['after'][key]:.2f}",
                    "–" if chance is None else f"{chance:.2f}",
                ]
            )
        print(f"{name} ({zoo_profile}: {run['spec']['steps']} steps of {run['spec']['batch_size']} scenes)")
        print(markdown_table(["metric", "before", "after", "chance"], rows), "\n")

# %% [markdown]
# ## 2 · Grounding for free: CLIP's phrase → region similarity
#
# A multimodal backbone can already point at what a phrase names: the cosine between the phrase's embedding and each
# patch's embedding (the patch tokens through CLIP's image projection) is a heat map over the image. A unimodal
# backbone has no such map — its image features and BERT's text features live in unrelated spaces, and TransVG's
# fusion has to learn the correspondence from the grounding data alone.

# %%
vgstudy.show_source(zoo.phrase_similarity_maps)

# %%
if params.profile != "paper":
    clip = pretrained["clip-tiny"]
    shown = SynthRef("testA", 4, seed=params.seed, image_size=clip.visual.image_size)
    transform = GroundingTransform(
        TransformConfig(image_size=clip.visual.image_size, mean=clip.visual.mean, std=clip.visual.std)
    )
    items = [transform(shown[i]) for i in range(len(shown))]
    maps = zoo.phrase_similarity_maps(clip, torch.stack([it["image"] for it in items]), [it["text"] for it in items])
    fig, axes = plt.subplots(2, len(items), figsize=(3 * len(items), 6))
    for k in range(len(items)):
        sample = shown[k]
        viz.show_sample(axes[0, k], sample.image, sample.text, gt_xyxy=sample.box_xyxy.tolist())
        axes[1, k].imshow(maps[k], cmap="magma")
        axes[1, k].set(title="phrase-patch cosine", xticks=[], yticks=[])
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## 3 · TransVG from three starting points
#
# Same architecture, same data, same training; only the backbones differ:
#
# | variant | visual branch | text branch |
# |---|---|---|
# | random | the ViT with random weights | MiniLM (pretrained) |
# | unimodal | vit-tiny (vision-only pretraining) | MiniLM (pretrained) |
# | clip | clip-tiny's image tower | clip-tiny's text tower |
#
# In the `tiny` profile both backbones are frozen (`freeze_backbones`): only the projections, the visual-linguistic
# transformer and the box head train, which keeps a step cheap on a CPU. Frozen backbones give the same output for the
# same input in every epoch, so with `remember_backbones` the training inputs are fixed (no augmentation) and each one
# runs through the backbones once: every epoch after the first runs only what trains (`vgstudy.models.memo`; about 4x
# faster per step here, `benchmarks/README.md`). The `paper` profile trains the backbones at 0.1 × the learning rate,
# with the release's augmentation, as the release does.


# %%
def build_variant(variant: str):
    """(TransVG with the variant's backbones for the active profile, its model card: registered name + overrides)."""
    frozen = {"freeze_visual": params.freeze_backbones, "freeze_text": params.freeze_backbones}
    if params.profile == "paper":
        if variant == "clip":
            clip = {"visual": "clip:ViT-B-16", "text": "clip:ViT-B-16", "visual_weights": params.clip_weights}
            return build("transvg-r50", **clip, **frozen), ("transvg-r50", {**clip, **frozen})
        # random: the visual branch from scratch, BERT pretrained (as in the tiny profile); unimodal: both pretrained.
        weights = {"visual_weights": params.detr_weights} if variant == "unimodal" else {}
        weights["text_weights"] = params.bert_weights
        return build("transvg-r50", **weights, **frozen), ("transvg-r50", {**weights, **frozen})
    # The small backbones come from the zoo; the checkpoint holds their weights, so the card names only the model.
    if variant == "clip":
        modules = {"visual_module": pretrained["clip-tiny"], "text_module": pretrained["clip-tiny"]}
        return build("transvg-tiny-clip", **modules, **frozen), ("transvg-tiny-clip", frozen)
    visual = pretrained["vit-tiny"] if variant == "unimodal" else build_backbone("dinov2:tiny")
    return build("transvg-tiny", visual_module=visual, **frozen), ("transvg-tiny", {"visual": "dinov2:tiny", **frozen})


train_samples, eval_samples = grounding_data(params)
floors = baselines(eval_samples, seed=params.seed)
splits = eval_split_names(params)
results = {}
for variant in params.variant_list():
    torch.manual_seed(params.seed)
    model, card = build_variant(variant)
    scale = {} if params.freeze_backbones else {"visual.": params.backbone_lr_scale, "text.": params.backbone_lr_scale}
    stage = Stage("train", epochs=params.epochs, lr=params.lr, lr_scale=scale, warmup_steps=10)
    results[variant] = train_and_evaluate(
        model,
        train_samples,
        eval_samples,
        out / variant,
        stages=(stage,),
        batch_size=params.batch_size,
        seed=params.seed,
        device=params.device,
        params={"variant": variant, **vgstudy.config.as_dict(params)},
        model_card=card,
        augment=not params.remember_backbones,
        remember_backbones=params.remember_backbones,
    )
    counts = describe(model)
    results[variant]["parameters"] = {"total": counts["total"], "trainable": counts["trainable"]}
    print(
        f"{variant}: {results[variant]['steps']} steps in {results[variant]['train_time_s']:.0f} s; "
        f"trainable {counts['trainable']:,} of {counts['total']:,} parameters"
    )

# %% [markdown]
# Accuracy (Acc@0.5, %) per split, beside the trivial baselines of notebook 00 and TransVG-R50's numbers on RefCOCO
# (Table 1 of the paper; a different data set and a 90-epoch schedule, shown for scale, not for comparison).

# %%
rows = [[variant] + [f"{results[variant]['metrics'][s]['acc50']:.1f}" for s in splits] for variant in results]
rows += [[f"baseline: {name}"] + [f"{floors[name][s]:.1f}" for s in splits] for name in floors]
if params.dataset == "synthref":
    paper_rows = [reported("transvg", f"main/transvg-r50/unc/{s}") for s in splits]
    rows.append(["TransVG-R50, RefCOCO (reported)"] + [f"{r.value:.1f} ({r.source})" for r in paper_rows])
print(markdown_table(["model"] + list(splits), rows))

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.8 / max(1, len(results))
for k, variant in enumerate(results):
    values = [results[variant]["metrics"][s]["acc50"] for s in splits]
    ax.bar([i + k * width for i in range(len(splits))], values, width, label=variant)
best_floor = {s: max(floors[name][s] for name in floors if not name.startswith("oracle")) for s in splits}
for i, s in enumerate(splits):
    ax.hlines(best_floor[s], i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="--")
ax.set_xticks([i + 0.4 - width / 2 for i in range(len(splits))], splits)
ax.set(ylabel="Acc@0.5 (%)", title="TransVG by starting backbones (dashed: best trivial baseline)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4 · Verdicts, computed
#
# Each claim below is checked against the numbers above: a difference counts only when it is larger than two standard
# errors of the difference (`vgstudy.compare.difference`; binomial, on the split's samples), so evaluation noise does
# not.


# %%
# NBVAL_CHECK_OUTPUT
def beyond_noise(better: float, worse: float, n: int) -> bool:
    """Whether accuracy `better` (%) exceeds `worse` (%), both on n samples, by more than the noise."""
    gap, margin = difference(estimate([better], n), estimate([worse], n))
    return gap > margin


verdicts = {}
for variant in results:
    metrics = results[variant]["metrics"]
    above = all(beyond_noise(metrics[s]["acc50"], best_floor[s], metrics[s]["n"]) for s in splits)
    verdicts[f"{variant} beats every trivial baseline on every split"] = above
first = "val" if "val" in splits else splits[0]
for variant in ("unimodal", "clip"):
    if variant in results and "random" in results:
        ours, theirs = results[variant]["metrics"][first], results["random"]["metrics"][first]
        verdicts[f"{variant} backbones beat random ones ({first})"] = beyond_noise(
            ours["acc50"], theirs["acc50"], ours["n"]
        )
for claim, holds in verdicts.items():
    print(f"{'yes' if holds else 'no ':3s}  {claim}")
written = (out / "results.json").write_text(
    json.dumps(
        {"params": vgstudy.config.as_dict(params), "results": results, "baselines": floors, "verdicts": verdicts},
        indent=2,
        default=str,
    )
)

# %% [markdown]
# ## What this shows
#
# The verdicts above are the measured outcome at this profile's budget. In the `tiny` profile each TransVG trains for a
# few dozen optimiser steps on frozen features; its visual-linguistic transformer has to learn, from the box loss
# alone, which visual tokens the words refer to, and a budget this small is not enough to leave the mean-box plateau.
# `benchmarks/grounding_diagnosis.py` separates the reasons: the same fusion head trained on *perfect* token features
# (a symbolic oracle of each cell's object) still needs thousands of steps, while a one-layer text-to-patch attention
# probe learns the attribute expressions far sooner; the small backbones, pretrained for a minute, encode colour but
# barely shape; and even 5000 steps on 6000 scenes with larger objects (scale 1.8) leave the head at 28 % on val,
# under the strongest trivial baseline there (29–35 %), while it fits its training set better (43 %). Remembering the
# frozen backbones (above) makes each step after the first epoch about 4x cheaper, which is what lets the `study`
# profile (`notebooks/params/01-study.yaml`: 8000 scenes, 20 epochs, scale 1.8) run on a CPU at all; the `paper`
# profile runs the release's recipe on the real backbones.
