"""EpmVG-R's (reconstruction) study in notebook 04: the ablation grid A0..A9 as data, the modality gap measured, the
cost of distillation per training step, and the numbers the verdicts are computed from.

The grid is ours: EpmVG's ablations are not public (only its abstract is), so each row asks one question of the
reconstruction. Every row trains the same TransVG student from the same initialisation; rows differ only in which
distillation terms of `vgstudy.losses_epmvg.EpmVGRCriterion` are on (weights 1, the criterion's scale) and in the
teacher. A9 is a sweep: the full loss with every weight multiplied by each of the given scales.

The modality gap is measured on held-out (image, expression) pairs, in three spaces: the teacher's own embeddings,
the student's own fused-width features (its visual and text tokens after their projections to the fusion width,
averaged, the inputs of its visual-linguistic transformer), and the student's features through EpmVG-R's
projection heads (the teacher's space, where D1-D3 act). In each: retrieval top-1 both ways (an expression that
occurs twice counts either of its images as a hit), the cosine of matched and of unmatched pairs, and the distance
between the two modalities' centroids of unit-norm embeddings (the "modality gap" of Liang et al., NeurIPS 2022).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from vgstudy.compare import difference as compare_difference
from vgstudy.compare import estimate
from vgstudy.data.transforms import collate
from vgstudy.errors import ConfigError
from vgstudy.losses_epmvg import DISTILLATION_TERMS, EpmVGRCriterion
from vgstudy.models.epmvg import EpmVGR, masked_mean

# The symbols of the criterion's terms, as the notebook and the grid table name them.
TERM_SYMBOLS = {"feature": "D1", "relation": "D2", "contrastive": "D3", "region": "D4"}
TEACHER_TERMS = ("feature", "relation", "region")  # the terms that read the teacher (D3 does not)


# --- The grid -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ablation:
    """One row of the grid: the distillation terms switched on (term -> weight), the teacher, the question asked.

    sweep: the row runs once per weight scale (A9), its weights multiplied by the scale.
    """

    name: str
    question: str
    weights: Mapping[str, float] = field(default_factory=dict)
    teacher: str = "multimodal"
    sweep: bool = False

    def terms(self) -> str:
        """The terms switched on, e.g. "D1+D2+D4", or "none"."""
        return "+".join(TERM_SYMBOLS[t] for t in DISTILLATION_TERMS if t in self.weights) or "none"

    @property
    def reads_teacher(self) -> bool:
        """Whether a term switched on reads the teacher (else the teacher never runs)."""
        return any(term in self.weights for term in TEACHER_TERMS)


_FULL = {"feature": 1.0, "relation": 1.0, "region": 1.0}  # the full reconstruction: every term that reads a teacher

GRID: dict[str, Ablation] = {
    row.name: row
    for row in (
        Ablation("A0", "the baseline: TransVG, no distillation (teacher never run)"),
        Ablation("A1", "feature distillation alone", {"feature": 1.0}),
        Ablation("A2", "relation (image-text consistency) distillation alone", {"relation": 1.0}),
        Ablation("A3", "teacher-free control: the student's own image-text contrast", {"contrastive": 1.0}),
        Ablation("A4", "region distillation alone", {"region": 1.0}),
        Ablation("A5", "the two global terms", {"feature": 1.0, "relation": 1.0}),
        Ablation("A6", "relations plus regions", {"relation": 1.0, "region": 1.0}),
        Ablation("A7", "full EpmVG-R: every term that reads the teacher", _FULL),
        Ablation("A8", "control: A7 with a unimodal teacher (no image-text alignment)", _FULL, teacher="unimodal"),
        Ablation("A9", "weight sweep: A7 with every weight x scale", _FULL, sweep=True),
    )
}


@dataclass(frozen=True)
class GridRun:
    """One trained configuration: a grid row at a weight scale. `key` names its row in tables and its run folder."""

    key: str
    ablation: Ablation
    scale: float = 1.0

    @property
    def weights(self) -> dict[str, float]:
        """Every term's weight (0: off), as `EpmVGRCriterion`'s keyword arguments."""
        return {term: self.scale * self.ablation.weights.get(term, 0.0) for term in DISTILLATION_TERMS}

    @property
    def distils(self) -> bool:
        return any(self.weights.values())


def grid_names(text: str) -> tuple[str, ...]:
    """The names in "A0, A7,A8" -> ("A0", "A7", "A8"); ConfigError for an unknown or repeated name, or none."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in GRID]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if unknown or repeated or not names:
        what = f"unknown {unknown}" if unknown else f"repeated {repeated}" if repeated else "no name"
        raise ConfigError(f"grid={text!r}: {what}; expected comma-separated names among {', '.join(GRID)}")
    return names


def grid_runs(names: str | Sequence[str], scales: Sequence[float] = ()) -> list[GridRun]:
    """The runs of the named rows, in the grid's order; A9 once per scale ("A9x0.5", ...), needing at least one."""
    names = grid_names(names) if isinstance(names, str) else grid_names(",".join(names))
    runs = []
    for name in (n for n in GRID if n in names):
        ablation = GRID[name]
        if not ablation.sweep:
            runs.append(GridRun(name, ablation))
            continue
        numbers = all(isinstance(s, int | float) and not isinstance(s, bool) for s in scales)
        if (
            not scales
            or not numbers
            or not all(math.isfinite(s) and s > 0 for s in scales)
            or len(set(scales)) < len(scales)
        ):
            raise ConfigError(f"{name} sweeps the weights: expected distinct scales, numbers > 0, got {list(scales)!r}")
        runs += [GridRun(f"{name}x{scale:g}", ablation, float(scale)) for scale in scales]
    return runs


def grid_table(names: Sequence[str] | None = None) -> list[list[str]]:
    """Rows [name, terms, teacher ("–" when none is read), question, run] of the whole grid; run is "yes" for the
    rows in `names` (all rows when None)."""
    chosen = set(GRID if names is None else names)
    return [
        [row.name, row.terms(), row.teacher if row.reads_teacher else "–", row.question, "yes" * (row.name in chosen)]
        for row in GRID.values()
    ]


# --- Accuracy over seeds, and when a difference is more than noise --------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def standard_error(values: Sequence[float], n: int) -> float:
    """Standard error (percentage points) of the mean of accuracies (%), one per seed, each on the same n samples
    (`vgstudy.compare.Estimate`: the evaluation set's binomial error joined with the seeds' spread)."""
    return estimate(values, n).standard_error


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) in percentage points, and the margin it must exceed: two standard errors of the difference
    (independent errors: conservative when both were evaluated on the same samples)."""

    delta: float
    margin: float

    @property
    def outcome(self) -> str:
        """Whether a beats b: "better", "worse" or "same" (within the margin)."""
        return "better" if self.delta > self.margin else "worse" if self.delta < -self.margin else "same"

    @classmethod
    def of_estimates(cls, a: float, se_a: float, b: float, se_b: float) -> Difference:
        """a - b for two estimates with their standard errors (e.g. two `modality_gap` AUCs)."""
        return cls(a - b, 2 * math.hypot(se_a, se_b))

    def text(self, unit: str = " pp", digits: int = 1) -> str:
        return f"{self.delta:+.{digits}f} ± {self.margin:.{digits}f}{unit} ({self.outcome})"

    def __str__(self) -> str:
        return self.text()


def difference(a: Sequence[float], b: Sequence[float], n: int) -> Difference:
    """a, b: accuracies (%) of two configurations, one per seed, each measured on n samples."""
    if not a or not b or n < 1:
        raise ConfigError(f"difference: expected values on both sides and n >= 1, got {len(a)}, {len(b)}, n={n}")
    return Difference(*compare_difference(estimate(a, n), estimate(b, n)))


# --- The modality gap -----------------------------------------------------------------------------------------------


@torch.no_grad()
def pair_embeddings(
    model: EpmVGR, data: Dataset, *, batch_size: int = 32, device: str | torch.device = "cpu", teacher: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Unit-norm (image, text) embeddings of every (image, expression) pair of a transformed data set, per space:

    "student"    the student's visual and text tokens after their projections to the fusion width, each averaged over
                 its real tokens: (N, dim) each, what its visual-linguistic transformer reads;
    "projected"  the same through EpmVG-R's image and text projection heads, in the teacher's space: (N, De);
    "teacher"    the teacher's own embeddings of the whole image and of the expression (only with teacher=True).

    The model runs in eval mode (no dropout) and is put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    parts: dict[str, list[list[torch.Tensor]]] = {}
    try:
        for batch in loader:
            images, valid = batch["images"].to(device), batch["valid"].to(device)
            aux = model.student(images, batch["texts"], valid).aux
            spaces = {
                "student": (
                    masked_mean(aux["visual_tokens"], aux["visual_mask"]),
                    masked_mean(aux["text_tokens"], aux["text_mask"]),
                )
            }
            projected = model.embed(aux)
            spaces["projected"] = (projected["image"], projected["text"])
            if teacher:
                spaces["teacher"] = (
                    model.teacher.encode_image(model.teacher_images(images, valid)),
                    model.teacher.encode_text(batch["texts"]),
                )
            for name, (image, text) in spaces.items():
                rows = parts.setdefault(name, [[], []])
                rows[0].append(F.normalize(image.float(), dim=-1).cpu())
                rows[1].append(F.normalize(text.float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return {name: (torch.cat(images), torch.cat(texts)) for name, (images, texts) in parts.items()}


def _same_key(keys: Sequence[str] | None, n: int) -> torch.Tensor:
    """(n, n) bool: pairs i, j that count as a match (the same expression; only i == j without keys)."""
    if keys is None:
        return torch.eye(n, dtype=torch.bool)
    if len(keys) != n:
        raise ConfigError(f"modality gap: {len(keys)} keys for {n} pairs")
    codes = {key: code for code, key in enumerate(dict.fromkeys(keys))}
    index = torch.tensor([codes[key] for key in keys])
    return index[:, None] == index[None, :]


def _unit_pairs(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if image.ndim != 2 or image.shape != text.shape or len(image) < 2:
        raise ConfigError(
            f"modality gap: expected (N, D) image and text embeddings of one shape, N >= 2; got "
            f"{tuple(image.shape)} and {tuple(text.shape)}"
        )
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def similarities(
    image: torch.Tensor, text: torch.Tensor, keys: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of the matched pairs (N,) and of the unmatched ones (pairs of different expressions)."""
    image, text = _unit_pairs(image, text)
    cosine = image @ text.t()  # (N, N): image i, text j
    same = _same_key(keys, len(image))
    return cosine.diagonal().clone(), cosine[~same]


def modality_gap(image: torch.Tensor, text: torch.Tensor, keys: Sequence[str] | None = None) -> dict[str, float]:
    """How well N (image, text) pairs are aligned in one space (keys: each pair's expression, so that a repeated
    expression's images all count as hits).

    image_to_text_top1, text_to_image_top1: retrieval among the N pairs (%); chance_top1: a random pick's (%);
    matched_cosine, unmatched_cosine: mean cosines; centroid_distance: |mean(image) - mean(text)| of the unit
    vectors (0: the two modalities occupy the same region; up to 2); matched_auc: per image, the share of the other
    expressions whose cosine its own expression's exceeds (ties half), averaged (0.5: no alignment), and
    matched_auc_se, its standard error over the images.
    """
    image, text = _unit_pairs(image, text)
    cosine = image @ text.t()
    same = _same_key(keys, len(image))
    rows = torch.arange(len(image))
    matched, unmatched = cosine.diagonal(), cosine[~same]
    own = matched[:, None]  # (N, 1)
    wins = ((cosine < own).float() + 0.5 * (cosine == own).float()) * (~same).float()
    scored = (~same).any(dim=1)  # images with at least one other expression
    auc = wins.sum(dim=1)[scored] / (~same).sum(dim=1)[scored]
    return {
        "matched_auc": auc.mean().item() if len(auc) else float("nan"),
        "matched_auc_se": (auc.std() / math.sqrt(len(auc))).item() if len(auc) > 1 else float("nan"),
        "image_to_text_top1": 100 * same[rows, cosine.argmax(dim=1)].float().mean().item(),
        "text_to_image_top1": 100 * same[cosine.argmax(dim=0), rows].float().mean().item(),
        "chance_top1": 100 * same.float().mean().item(),
        "matched_cosine": matched.mean().item(),
        "unmatched_cosine": unmatched.mean().item() if len(unmatched) else float("nan"),
        "centroid_distance": (image.mean(dim=0) - text.mean(dim=0)).norm().item(),
    }


# --- What distillation costs per training step ----------------------------------------------------------------------


def _training_step(model: EpmVGR, criterion: EpmVGRCriterion, batch: dict, optimizer: torch.optim.Optimizer) -> None:
    output = model(batch["images"], batch["texts"])  # as the Trainer calls it
    loss = criterion(output, batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_times(
    configurations: Mapping[str, tuple[EpmVGR, Mapping[str, float]]], batch: dict, *, steps: int = 3, lr: float = 1e-4
) -> dict[str, dict[str, list[float]]]:
    """Seconds of `steps` training steps (forward, criterion, backward, AdamW) of each configuration, {name: (model,
    criterion weights)}, on one batch: {name: {"wall_s": [...], "cpu_s": [...]}}, cpu_s being this process's CPU time
    (all its threads: less sensitive than wall time to other processes on the machine). The configurations take turns,
    one step each, so that a change in the machine's load falls on all of them alike; one untimed step each first. On
    copies of the models; the teacher is recomputed at every step (no cache)."""
    if steps < 1:
        raise ConfigError(f"step_times: steps={steps!r}, expected >= 1")
    runs = {}
    for name, (model, weights) in configurations.items():
        model = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        runs[name] = (model, EpmVGRCriterion(model, **weights), optimizer)
    times: dict[str, dict[str, list[float]]] = {name: {"wall_s": [], "cpu_s": []} for name in runs}
    for step in range(steps + 1):
        for name, (model, criterion, optimizer) in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            _training_step(model, criterion, batch, optimizer)
            if step:
                times[name]["wall_s"].append(time.perf_counter() - wall)
                times[name]["cpu_s"].append(time.process_time() - cpu)
    return times


def training_flops(model: EpmVGR, weights: Mapping[str, float], batch: dict) -> int:
    """FLOPs of one training forward + criterion (the teacher included) + backward on `batch` (torch's counter), on a
    copy of `model`."""
    model = copy.deepcopy(model).train()
    criterion = EpmVGRCriterion(model, **weights)
    with FlopCounterMode(display=False) as counter:
        criterion(model(batch["images"], batch["texts"]), batch)["loss"].backward()
    return counter.get_total_flops()


# --- The other methods' notebooks -----------------------------------------------------------------------------------


_CONTAINERS = ("results", "runs")  # keys that hold models without naming one
_NOT_MODELS = ("metrics", "params", "parameters", "baselines", "config", "best", "summary", "accuracy", "comparisons")


def _accuracy_rows(tree, splits: Sequence[str], label: str = "") -> dict[str, list[dict[str, float]]]:
    """Every {"metrics": {split: {"acc50": ...}}} in a results tree that covers `splits`, by where it is: {label:
    [{split: acc50}, one per run]}; the runs of a list (one per seed) share their list's label."""
    rows: dict[str, list[dict[str, float]]] = {}

    def merge(found: dict[str, list[dict[str, float]]]) -> None:
        for key, values in found.items():
            rows.setdefault(key, []).extend(values)

    if isinstance(tree, list):
        for item in tree:
            merge(_accuracy_rows(item, splits, label))
        return rows
    if not isinstance(tree, dict):
        return rows
    metrics = tree.get("metrics")
    if isinstance(metrics, dict) and all(isinstance(metrics.get(s), dict) for s in splits):
        values = {s: metrics[s].get("acc50") for s in splits}
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            merge({label or "model": [{s: float(v) for s, v in values.items()}]})
    for key, value in tree.items():
        if key not in _NOT_MODELS:
            merge(_accuracy_rows(value, splits, label if key in _CONTAINERS else f"{label}/{key}".lstrip("/")))
    return rows


@dataclass(frozen=True)
class OtherRun:
    """Another notebook's finished run: its results.json, its parameters, and Acc@0.5 per split of every model in it
    ({label: [{split: acc50}, one per seed]})."""

    path: Path
    params: dict
    rows: dict[str, list[dict[str, float]]]


def other_method_results(
    out_dir: str | Path, notebook: str, *, profile: str, dataset: str, splits: Sequence[str]
) -> OtherRun | None:
    """The newest `<out_dir>/<notebook>/<run>/results.json` of a run with the same profile and data set (as its
    "params" say) that has a model evaluated on every split; None when there is none. Unreadable files are passed
    over: another notebook's run must not break this one."""
    candidates = []
    for path in Path(out_dir).glob(f"{notebook}/*/results.json"):
        try:
            results = json.loads(path.read_text())
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        params = results.get("params") if isinstance(results, dict) else None
        if not isinstance(params, dict):
            params = {}
        if params.get("profile", profile) == profile and params.get("dataset", dataset) == dataset:
            candidates.append((mtime, path, params, results))
    for _, path, params, results in sorted(candidates, key=lambda c: c[0], reverse=True):
        rows = _accuracy_rows(results, splits)
        if rows:
            return OtherRun(path, params, rows)
    return None
