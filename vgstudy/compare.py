"""Every method side by side: which exist, each built and trained under one budget, scored per split and per
expression family, and what each costs (parameters, FLOPs, step time, throughput, peak memory, GPU energy).

Notebook 05 reads like this module, top to bottom:

- `plan_methods` says which of the study's methods are registered and which are missing;
- `build_method`, `criterion_for` and `stages_for` give each method its own model, loss and release learning rates,
  scaled to one shared budget (epochs, batch, base learning rate);
- `evaluate` scores a trained model per split and per SynthRef expression family (attribute, relation, position,
  comparative), pooled over the splits;
- `Estimate` / `difference` / `ranking` carry the noise of every accuracy (evaluation sampling and seed spread), so a
  verdict never rests on a difference smaller than the noise;
- `measure_efficiency` times one training step (with the method's own loss) and one inference step, counts FLOPs
  with `torch.utils.flop_counter`, and reads the peak memory and, on an NVIDIA GPU with NVML, the energy.
`benchmarks/models.py` measures with the same `StepRunner`, `PeakMemory` and `measure`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import re
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from vgstudy.errors import ConfigError
from vgstudy.evaluate import box_metrics, cxcywh_to_xyxy, metrics_by_family, predict_boxes

MB = 2**20
# TransVG's (and MaPPER's) release learning rate. A run's `lr` plays its part: every method's release rates are scaled
# by lr / RELEASE_LR, so lr = 1e-4 is each release's own recipe and a larger lr speeds every method up alike.
RELEASE_LR = 1e-4


# --- The methods ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One of the study's methods: its registered models and where its paper's numbers are.

    key:             the name a notebook's `methods` parameter uses.
    label:           the name tables print.
    small, paper:    the registered model for the tiny/study profiles, and for the paper profile.
    paper_key:       papers/<paper_key>.yaml.
    reported_model:  the model whose accuracy the paper reports (None: no public number to compare with).
    efficiency_ids:  (paper key, result id) of the parameter counts and FLOPs recorded for it.
    deployed:        the attribute holding what is kept at inference (EpmVG-R: its student), None: the whole model.
    """

    key: str
    label: str
    small: str
    paper: str
    paper_key: str
    reported_model: str | None
    efficiency_ids: tuple[tuple[str, str], ...] = ()
    deployed: str | None = None

    def model_name(self, profile: str) -> str:
        return self.paper if profile == "paper" else self.small


METHODS: dict[str, Method] = {
    method.key: method
    for method in (
        Method(
            "transvg",
            "TransVG",
            "transvg-tiny",
            "transvg-r50",
            "transvg",
            "TransVG-R50",
            efficiency_ids=(("hivg", "efficiency/transvg/gflops"),),
        ),
        Method(
            "hivg",
            "HiVG",
            "hivg-tiny",
            "hivg-b",
            "hivg",
            "HiVG-B",
            efficiency_ids=(
                ("hivg", "params/hivg-b/unc/total"),
                ("hivg", "params/hivg-b/unc/trainable"),
                ("hivg", "efficiency/hivg-b/gflops"),
            ),
        ),
        Method(
            "mapper",
            "MaPPER",
            "mapper-tiny",
            "mapper-b",
            "mapper",
            "MaPPER",
            efficiency_ids=(
                ("mapper", "params/mapper/backbone"),
                ("mapper", "params/mapper/trainable"),
                ("mapper", "params/mapper/trainable_pct"),
            ),
        ),
        Method("epmvg-r", "EpmVG-R", "epmvg-r-tiny", "epmvg-r-r50", "epmvg", None, deployed="student"),
    )
}


def parse_methods(text: str) -> tuple[str, ...]:
    """'transvg, hivg' -> ("transvg", "hivg"); a ConfigError names an unknown key and the known ones."""
    keys = tuple(dict.fromkeys(key for key in re.split(r"[,\s]+", text) if key))
    unknown = [key for key in keys if key not in METHODS]
    if unknown or not keys:
        raise ConfigError(f"methods {text!r}: expected a comma-separated subset of {', '.join(METHODS)}")
    return keys


def plan_methods(keys: Sequence[str], registered: Sequence[str], profile: str) -> tuple[list[Method], dict[str, str]]:
    """(the methods to run, {key: why missing}): a method is missing when its model for `profile` is not registered
    (its module is absent from this installation); the notebook runs the others and says so."""
    present, missing = [], {}
    for key in keys:
        method = METHODS[key]
        name = method.model_name(profile)
        if name in registered:
            present.append(method)
        else:
            missing[key] = f"{method.label}: model {name!r} is not registered in vgstudy.models"
    return present, missing


def model_card(
    method: Method,
    profile: str,
    *,
    weights: Mapping[str, str | Path | None] | None = None,
    freeze_backbones: bool = True,
) -> tuple[str, dict]:
    """(registered name, JSON-able build overrides) of the method's model for `profile`: what `build_method` builds,
    and what `vgstudy.predict.load_predictor` rebuilds before loading a trained run's checkpoint.

    tiny/study: the zoo's backbones are passed to the build as modules; the checkpoint holds their weights, so the card
    only names their configurations. paper: the local weight files `weights` = {"detr", "bert", "clip", "dinov2"}.
    """
    frozen = {"freeze_visual": freeze_backbones, "freeze_text": freeze_backbones}
    if profile != "paper":
        student = {"visual": "dinov2:tiny", **frozen}  # TransVG's, and EpmVG-R's student's, visual branch
        return method.small, {"transvg": student, "hivg": {}, "mapper": {}, "epmvg-r": student}[method.key]
    w = {key: None if value is None else str(value) for key, value in (weights or {}).items()}
    unimodal = {"visual_weights": w.get("detr"), "text_weights": w.get("bert"), **frozen}
    overrides = {
        "transvg": unimodal,
        "hivg": {"clip_weights": w.get("clip")},
        "mapper": {"visual_weights": w.get("dinov2"), "text_weights": w.get("bert"), "prior_weights": w.get("clip")},
        # OpenAI's CLIP file needs the QuickGELU variant (as HiVG's and MaPPER's defaults).
        "epmvg-r": {**unimodal, "teacher": "clip:ViT-B-16-quickgelu", "teacher_weights": w.get("clip")},
    }
    return method.paper, overrides[method.key]


def build_method(
    method: Method,
    profile: str,
    *,
    backbones: Mapping[str, nn.Module] | None = None,
    weights: Mapping[str, str | Path | None] | None = None,
    freeze_backbones: bool = True,
) -> nn.Module:
    """The method's model for `profile`.

    tiny/study: the small configs on the pretrained zoo backbones `backbones` = {"clip": clip-tiny, "vit": vit-tiny}
        (copied, so no method changes what another one starts from); TransVG and EpmVG-R's student read the vision-only
        ViT and MiniLM, HiVG the CLIP, MaPPER the ViT with CLIP's text tower as its prior, EpmVG-R's teacher the CLIP.
    paper: the full-size models from local weight files `weights` = {"detr", "bert", "clip", "dinov2"} (a missing
        one gives random weights: the efficiency figures stay right, the accuracy does not).
    freeze_backbones: TransVG's and EpmVG-R's student's backbones (HiVG and MaPPER freeze theirs by design).
    """
    from vgstudy.models import build

    name, overrides = model_card(method, profile, weights=weights, freeze_backbones=freeze_backbones)
    if profile == "paper":
        return build(name, **overrides)
    needed = {"clip", "vit"}
    if backbones is None or not needed <= set(backbones):
        raise ConfigError(f"build_method({method.key!r}, {profile!r}): expected backbones with keys {sorted(needed)}")
    clip, vit = (copy.deepcopy(backbones[key]) for key in ("clip", "vit"))
    frozen = {"freeze_visual": freeze_backbones, "freeze_text": freeze_backbones}
    modules = {
        "transvg": {"visual_module": vit, **frozen},
        "hivg": {"clip_module": clip},
        "mapper": {"visual_module": vit, "prior_module": clip},
        "epmvg-r": {"visual_module": vit, "teacher_module": clip, **frozen},
    }
    return build(name, **modules[method.key])


def criterion_for(method: Method, model: nn.Module):
    """The method's training loss: HiVG's (boxes + contrastive + alignment + mask terms, release weights), EpmVG-R's
    (boxes + the default distillation terms), TransVG's L1 + GIoU for TransVG and MaPPER."""
    if method.key == "hivg":
        from vgstudy.losses_hivg import HiVGCriterion

        return HiVGCriterion()
    if method.key == "epmvg-r":
        from vgstudy.losses_epmvg import EpmVGRCriterion

        return EpmVGRCriterion(model)
    from vgstudy.losses import BoxCriterion

    return BoxCriterion()


def split_epochs(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    """`total` epochs shared among stages in proportion to `weights`, at least one each: each stage's quota rounded
    down (and up to one), then the epochs left go to the stages furthest below their quota, or the extra ones come
    off the stages furthest above it."""
    if total < len(weights):
        raise ConfigError(f"{total} epochs cannot give each of {len(weights)} stages one; expected >= {len(weights)}")
    quotas = [total * w / sum(weights) for w in weights]
    counts = [max(1, math.floor(q)) for q in quotas]
    while sum(counts) < total:
        counts[max(range(len(counts)), key=lambda i: (quotas[i] - counts[i], -i))] += 1
    while sum(counts) > total:
        above = [i for i in range(len(counts)) if counts[i] > 1]
        counts[min(above, key=lambda i: (quotas[i] - counts[i], i))] -= 1
    return tuple(counts)


def stages_for(method: Method, model: nn.Module, *, epochs: int, lr: float, warmup_steps: int = 0):
    """The Trainer stages of the method's release recipe within the shared budget: `epochs` in all, every release
    learning rate scaled by lr / RELEASE_LR. HiVG: its HiLoRA stages, epochs split as the release's (60, 20, 20, 20)
    and its stage rates; the others: one stage with the release's backbone rate (x 0.1)."""
    from vgstudy.train import Stage

    if method.key == "hivg":
        from vgstudy.models import hilora

        schedule = model.config.schedule
        if len(schedule) != len(hilora.RELEASE_EPOCHS):
            raise ConfigError(f"HiVG schedule of {len(schedule)} stages: the release's split needs 4")
        scale = lr / RELEASE_LR
        return hilora.trainer_stages(
            schedule,
            epochs=split_epochs(epochs, hilora.RELEASE_EPOCHS),
            lrs=[rate * scale for rate in hilora.RELEASE_LRS],
            warmup_steps=warmup_steps,
        )
    from vgstudy.models import epmvg, mapper, transvg

    lr_scale = {"transvg": transvg.LR_SCALE, "mapper": mapper.LR_SCALE, "epmvg-r": epmvg.LR_SCALE}[method.key]
    return (Stage("train", epochs=epochs, lr=lr, lr_scale=lr_scale, warmup_steps=warmup_steps),)


def min_epochs(method: Method) -> int:
    """The fewest epochs the method's schedule can run (HiVG: one per HiLoRA stage)."""
    if method.key == "hivg":
        from vgstudy.models import hilora

        return len(hilora.RELEASE_EPOCHS)
    return 1


def training_key(values: Mapping) -> str:
    """A short hash of the parameters a trained model depends on (a finished run with the same key is reused)."""
    text = json.dumps(dict(values), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def reported_accuracy(method: Method, dataset: str = "unc", splits: Sequence[str] = ("val", "testA", "testB")):
    """{split: Result} of the paper's Acc@0.5 for the method on `dataset` (papers/*.yaml); {} where it reports none."""
    from vgstudy.papers import load_paper

    if method.reported_model is None:
        return {}
    results = load_paper(method.paper_key).results
    found = {
        r.split: r
        for r in results
        if r.model == method.reported_model and r.dataset == dataset and r.metric == "acc50" and r.split in splits
    }
    return {split: found[split] for split in splits if split in found}


def format_reported(result) -> str:
    """A recorded number as a table prints it: counts with thousands separators, other metrics as given."""
    from vgstudy.papers import COUNT_METRICS

    return f"{int(result.value):,}" if result.metric in COUNT_METRICS else f"{result.value:g}"


def reported_efficiency(method: Method) -> list:
    """The parameter counts and FLOPs recorded for the method (`Method.efficiency_ids`), as papers.Result."""
    from vgstudy.papers import reported

    return [reported(paper, id) for paper, id in method.efficiency_ids]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table as text (printed: readable in a notebook and stable for nbval)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- Accuracy -------------------------------------------------------------------------------------------------------


def pooled_accuracy(
    metrics: Mapping[str, Mapping[str, float]], splits: Sequence[str] | None = None
) -> tuple[float, int]:
    """(Acc@0.5 (%) over the samples of `splits` together (every split when None), their number) from a run's
    per-split metrics {split: {"acc50", "n"}}."""
    chosen = list(metrics) if splits is None else list(splits)
    n = sum(int(metrics[split]["n"]) for split in chosen)
    if n == 0:
        raise ConfigError(f"pooled_accuracy: no evaluated sample in the splits {chosen}")
    return sum(metrics[split]["acc50"] * metrics[split]["n"] for split in chosen) / n, n


def evaluate(
    model: nn.Module, evals: Mapping[str, Dataset], *, batch_size: int = 32, device: str | torch.device = "cpu"
) -> dict[str, dict]:
    """One pass over every split with the model's eval transform: {"splits": {split: box_metrics}, "families":
    {family: box_metrics over all splits together}} (families only for samples that carry one, as SynthRef's)."""
    from vgstudy.data import GroundingTransform, TransformedDataset, collate

    transform = GroundingTransform(dataclasses.replace(model.transform, train=False))
    splits, preds, targets, families = {}, [], [], []
    for split, data in evals.items():
        out = predict_boxes(
            model, TransformedDataset(data, transform), collate_fn=collate, batch_size=batch_size, device=device
        )
        splits[split] = box_metrics(cxcywh_to_xyxy(out["pred_cxcywh"]), cxcywh_to_xyxy(out["target_cxcywh"]))
        preds.append(out["pred_cxcywh"])
        targets.append(out["target_cxcywh"])
        families += out["families"]
    pooled = metrics_by_family(torch.cat(preds), torch.cat(targets), families) if preds else {}
    return {"splits": splits, "families": pooled}


@dataclass(frozen=True)
class Estimate:
    """An accuracy (%) measured with `seeds` training seeds, each on the same `n` evaluation samples.

    Its standard error has two parts: the evaluation set's sampling (binomial, n samples; shared by the seeds, so it
    does not shrink with them) and the spread between seeds (std / sqrt(seeds); unknown with one seed).
    """

    mean: float
    std: float
    seeds: int
    n: int

    @property
    def standard_error(self) -> float:
        p = min(max(self.mean / 100, 1 / self.n), 1 - 1 / self.n)  # never 0: a 0% on 50 samples is not exact
        binomial = 100 * math.sqrt(p * (1 - p) / self.n)
        return math.sqrt(binomial**2 + self.std**2 / self.seeds)

    @property
    def margin(self) -> float:
        """Two standard errors: a difference smaller than this is noise."""
        return 2 * self.standard_error

    def __str__(self) -> str:
        spread = f" ± {self.std:.1f}" if self.seeds > 1 else ""
        return f"{self.mean:.1f}{spread}"


def estimate(values: Sequence[float], n: int) -> Estimate:
    """The Estimate of one accuracy per seed, each on n samples."""
    values = [float(v) for v in values]
    if not values or n < 1 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"estimate({values}, n={n}): expected finite accuracies and n >= 1")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Estimate(statistics.fmean(values), std, len(values), n)


def difference(a: Estimate, b: Estimate) -> tuple[float, float]:
    """(a - b, two standard errors of the difference), the two taken as independent (conservative: the methods see
    the same samples, which would make the difference less noisy)."""
    return a.mean - b.mean, 2 * math.hypot(a.standard_error, b.standard_error)


def ranking(estimates: Mapping[str, Estimate]) -> dict:
    """The best of several estimates and whether its lead over the runner-up is beyond the noise:
    {"best", "tied" (every name with the best mean, best first), "runner_up", "gap", "margin", "decisive"}
    (runner_up None, gap and margin nan with one estimate)."""
    if not estimates:
        raise ConfigError("ranking: no estimates to rank")
    order = sorted(estimates, key=lambda name: (-estimates[name].mean, name))
    best = order[0]
    tied = [name for name in order if estimates[name].mean == estimates[best].mean]
    if len(order) == 1:
        return {"best": best, "tied": tied, "runner_up": None, "gap": math.nan, "margin": math.nan, "decisive": False}
    gap, margin = difference(estimates[best], estimates[order[1]])
    return {"best": best, "tied": tied, "runner_up": order[1], "gap": gap, "margin": margin, "decisive": gap > margin}


# --- Efficiency: memory, one step, FLOPs, energy ----------------------------------------------------------------------


def uses_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


class PeakMemory:
    """The peak memory of one measurement above a baseline, in MiB: `set_baseline()` when what should not count is
    in place, `reset()` at the measurement's start, `peak_mb()` at its end. `baseline` says when that was (for
    `method`, the description reports print).

    CUDA: torch.cuda.max_memory_allocated above the memory allocated at the baseline. CPU (Linux): the resident set's
    high-water mark (VmHWM) above the resident set at the baseline, reset through /proc/self/clear_refs after freed
    heap memory is handed back (malloc_trim), so an earlier measurement's cached memory does not count. Elsewhere:
    ru_maxrss, a high-water mark since the process started.
    """

    def __init__(self, device: torch.device, baseline: str = "before the model was built"):
        self.device = device
        self.baseline_mb = 0.0
        self.resettable = device.type == "cuda" or self._clear_refs()
        self.method = (
            f"torch.cuda.max_memory_allocated above the memory allocated {baseline}"
            if device.type == "cuda"
            else f"peak RSS (VmHWM, reset per measurement) above the RSS {baseline}"
            if self.resettable
            else f"peak RSS since the process started (ru_maxrss) above the RSS {baseline}"
        )

    @staticmethod
    def _status_mb(field: str) -> float | None:
        with contextlib.suppress(OSError):
            match = re.search(rf"^{field}:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
            if match:
                return int(match.group(1)) / 1024
        return None

    @staticmethod
    def _clear_refs() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _release_freed() -> None:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / MB
        rss = self._status_mb("VmRSS")
        return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def set_baseline(self) -> None:
        self._release_freed()
        self.baseline_mb = self.current_mb()

    def reset(self) -> None:
        self._release_freed()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB - self.baseline_mb
        peak = self._status_mb("VmHWM") if self.resettable else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return peak - self.baseline_mb


@dataclasses.dataclass
class Deadline:
    """The time a model may take; a step is started only when the last one says it will fit."""

    budget_s: float | None
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def fits(self, seconds: float) -> bool:
        return self.budget_s is None or time.perf_counter() - self.start + seconds <= self.budget_s


class StepRunner:
    """One inference or training step of `model` on a batch, synchronised so that wall time is the step's.

    criterion: the training loss (default TransVG's L1 + GIoU, the same for every model so that they compare; a
    method's own, e.g. with EpmVG-R's teacher, to time what its training really costs). A batch is a `collate` dict
    on the device.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, criterion=None):
        from vgstudy.losses import BoxCriterion

        self.model, self.device = model, device
        self.criterion = criterion if criterion is not None else BoxCriterion()
        self.bf16 = uses_bf16(device)
        self.optimizer: torch.optim.Optimizer | None = None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, mode: str) -> None:
        """Before a measurement: the mode's train/eval state and, for training, a fresh optimiser (its state is
        allocated inside the measurement, as in a real run)."""
        self.model.train(mode == "training")
        self.optimizer = None
        if mode == "training":
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            fused = True if self.device.type == "cuda" else None
            self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4, fused=fused)

    def end(self) -> None:
        """After a measurement: drop gradients and optimiser state, so the next one starts from the weights."""
        self.optimizer = None
        self.model.zero_grad(set_to_none=True)

    def step(self, mode: str, batch: dict, flops: dict | None = None) -> float:
        """Run one step; its wall time in seconds. A training step given `flops` also counts FLOPs per sample into
        it: "inference" for the forward, "training" for forward + backward (a training step, because
        FlopCounterMode follows modules through autograd, which inference_mode switches off)."""
        self._sync()
        start = time.perf_counter()
        if mode == "inference":
            with torch.inference_mode(), self._autocast():
                self.model(batch["images"], batch["texts"])
        else:
            counter = FlopCounterMode(display=False) if flops is not None else None
            with counter or contextlib.nullcontext():
                with self._autocast():
                    loss = self.criterion(self.model(batch["images"], batch["texts"]), batch)["loss"]
                forward = counter.get_total_flops() if counter else 0
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if counter:
                size = len(batch["texts"])
                flops.update(inference=forward / size, training=counter.get_total_flops() / size)
            self.optimizer.step()
        self._sync()
        return time.perf_counter() - start


def measure(
    runner: StepRunner,
    memory: PeakMemory,
    mode: str,
    batch: dict,
    steps: int,
    deadline: Deadline,
    log: Callable[[str], None],
    flops: dict | None = None,
) -> dict:
    """A warm-up step (counting FLOPs into `flops` when given) + up to `steps` timed steps (at least one) of one
    mode at one batch size."""
    size = len(batch["texts"])
    memory.reset()
    runner.begin(mode)
    warmup_s = runner.step(mode, batch, flops)
    times = [runner.step(mode, batch)]
    while len(times) < steps and deadline.fits(times[-1]):
        times.append(runner.step(mode, batch))
    peak = memory.peak_mb()
    runner.end()
    step_s = statistics.median(times)
    result = {
        "mode": mode,
        "batch": size,
        "steps": len(times),
        "step_s": step_s,
        "step_times_s": times,
        "warmup_s": warmup_s,
        "samples_per_s": size / step_s,
        "peak_mb": peak,
    }
    note = f" (of {steps}: over the time budget)" if len(times) < steps else ""
    log(f"{mode} batch {size}: {step_s:.3f} s/step x {len(times)}{note}, peak {peak:,.0f} MiB")
    return result


def measurement_batch(model: nn.Module, samples: Dataset, size: int, device: str | torch.device) -> dict:
    """The first `size` samples through the model's eval transform, collated, every tensor on `device`."""
    from vgstudy.data import GroundingTransform, collate

    if size > len(samples):
        raise ConfigError(f"a measurement batch of {size} needs as many samples; the data set has {len(samples)}")
    transform = GroundingTransform(dataclasses.replace(model.transform, train=False))
    batch = collate([transform(samples[i]) for i in range(size)])
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def forward_flops(model: nn.Module, batch: dict) -> float:
    """FLOPs per sample of one forward in eval mode (what inference computes: EpmVG-R's teacher and projections and
    any training-only head are left out), counted by FlopCounterMode (2 per multiply-add).

    Autograd stays on, as in `StepRunner`: FlopCounterMode's module tracking fails under no_grad."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch["images"], batch["texts"])  # the output (and its graph) is dropped here
    model.train(was_training)
    return counter.get_total_flops() / len(batch["texts"])


class EnergyMeter:
    """The energy an NVIDIA GPU draws, from NVML's total-energy counter (millijoules since the driver loaded; Volta
    and newer). It is the whole board's, idle power included, so measure over a second or more of work.

    `EnergyMeter.unavailable(device)` says why there is none (a CPU, no pynvml, no counter), else None.
    """

    def __init__(self, device: torch.device, nvml=None):
        """`nvml`: the pynvml module (imported when None; tests pass a stand-in)."""
        self.nvml = nvml if nvml is not None else _import_nvml()
        self.nvml.nvmlInit()
        self.handle = None
        # NVML numbers the physical GPUs and torch those left by CUDA_VISIBLE_DEVICES: find ours by its UUID.
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None) if nvml is None else None
        if uuid is not None:
            with contextlib.suppress(Exception):  # NVML's own error types; the index below is the fallback
                self.handle = self.nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        if self.handle is None:
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def millijoules(self) -> float:
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    @staticmethod
    def unavailable(device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"n/a on {device.type.upper()}"
        try:
            _import_nvml()
        except ImportError:
            return "n/a: pynvml (the nvidia-ml-py package) is not installed"
        return None


def _import_nvml():
    import pynvml

    return pynvml


def energy_per_sample(
    step: Callable[[], None], samples_per_step: int, meter: EnergyMeter, *, min_seconds: float = 2.0
) -> dict:
    """Joules per sample over repeated `step()` calls lasting at least `min_seconds` (the counter is coarse)."""
    start_mj, start = meter.millijoules(), time.perf_counter()
    steps = 0
    while steps == 0 or time.perf_counter() - start < min_seconds:
        step()
        steps += 1
    seconds = time.perf_counter() - start
    joules = (meter.millijoules() - start_mj) / 1000
    return {"joules_per_sample": joules / (steps * samples_per_step), "watts": joules / seconds, "steps": steps}


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def deployed_module(method: Method, model: nn.Module) -> nn.Module:
    """What the method keeps at inference (EpmVG-R: the student TransVG), for parameter counts."""
    return getattr(model, method.deployed) if method.deployed else model


def measure_efficiency(
    method: Method,
    model: nn.Module,
    batch: dict,
    *,
    criterion=None,
    steps: int = 2,
    device: str | torch.device = "cpu",
    energy_seconds: float = 2.0,
) -> dict:
    """What the trained model costs, on one `measurement_batch`:

    parameters    total and trainable as trained, and total at inference (`deployed_module`);
    gflops        per sample: "inference" (eval-mode forward), "training" (forward + loss + backward, the method's
                  own loss: EpmVG-R's teacher included);
    train_step_s, train_samples_per_s: a training step (forward, the method's loss, backward, AdamW);
    infer_step_s, infer_samples_per_s: a forward under inference_mode;
    memory_mb     the weights plus the training step's peak above what was allocated before it (on CUDA
                  max_memory_allocated, on CPU the peak resident set): what training needs beyond other models;
    energy        joules per sample of inference on a GPU through NVML, or None with `energy_note` saying why.
    Timings are medians of `steps` timed steps after an untimed warm-up; they vary with the machine and its load.
    """
    from vgstudy.models import describe

    device = torch.device(device)
    counts, deployed = describe(model), describe(deployed_module(method, model))
    memory = PeakMemory(device, baseline="with the trained model in memory")
    memory.set_baseline()
    runner = StepRunner(model, device, criterion)
    flops: dict[str, float] = {}
    deadline = Deadline(None)
    quiet = lambda message: None  # the notebook prints the table, not each step
    training = measure(runner, memory, "training", batch, steps, deadline, quiet, flops)
    inference = measure(runner, memory, "inference", batch, steps, deadline, quiet)
    result = {
        "parameters": {"total": counts["total"], "trainable": counts["trainable"], "inference": deployed["total"]},
        "gflops": {"inference": forward_flops(model, batch) / 1e9, "training": flops["training"] / 1e9},
        "batch": len(batch["texts"]),
        "train_step_s": training["step_s"],
        "train_samples_per_s": training["samples_per_s"],
        "infer_step_s": inference["step_s"],
        "infer_samples_per_s": inference["samples_per_s"],
        "memory_mb": parameter_bytes(model) / MB + training["peak_mb"],
        "memory_method": f"weights + the step's peak above the baseline ({memory.method})",
        "energy_joules_per_sample": None,
        "energy_note": EnergyMeter.unavailable(device),
    }
    if result["energy_note"] is None:
        try:
            meter = EnergyMeter(device)
        except Exception as e:  # NVML raises its own error types (no counter on this GPU, no permission)
            result["energy_note"] = f"n/a: NVML gave no energy counter ({type(e).__name__}: {e})"
        else:
            runner.begin("inference")
            energy = energy_per_sample(
                lambda: runner.step("inference", batch), len(batch["texts"]), meter, min_seconds=energy_seconds
            )
            result["energy_joules_per_sample"] = energy["joules_per_sample"]
            steps, watts = energy["steps"], energy["watts"]
            result["energy_note"] = f"NVML board energy over {steps} inference steps ({watts:.0f} W on average)"
    return result


# --- One scene, every method's box ------------------------------------------------------------------------------------


def predict_all(predictors: Mapping[str, object], image: torch.Tensor, text: str) -> dict[str, list[float]]:
    """{method: box_xyxy in the image's pixels} for one (3, H, W) uint8 image and an expression, from
    `vgstudy.predict.Predictor`s (each applies its model's eval transform and maps the box back)."""
    array = image.permute(1, 2, 0).contiguous().numpy()
    return {name: list(predictor.predict(array, text).box_xyxy) for name, predictor in predictors.items()}


METHOD_COLOURS = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#a65628", "#f781bf")


def show_predictions(
    ax, image: torch.Tensor, text: str, boxes: Mapping[str, Sequence[float]], gt_xyxy=None, title: str | None = None
) -> None:
    """The image under `title` and the expression, the ground truth (green, when given) and each method's box,
    dashed, in `METHOD_COLOURS` order."""
    from vgstudy import viz

    viz.show_sample(ax, image, text, gt_xyxy=gt_xyxy, title=title)
    for colour, (name, box) in zip(itertools.cycle(METHOD_COLOURS), boxes.items(), strict=False):
        viz.draw_box(ax, box, colour, name, linestyle="--")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
