"""The one Trainer for every method: AdamW, multi-stage schedules as data, DDP, logs, and exact resume.

A run is a sequence of `Stage`s (HiVG: a warm-up stage, then three HiLoRA stages; most methods: one stage). At each
stage start the model may change what it trains (`model.enter_stage(name)`), and the optimiser and learning-rate
schedule are built afresh over what is now trainable.

Everything a run does is a function of the config, the data and the checkpoint it resumes from, not of the process
history, so a run killed at any point and resumed with `resume="auto"` ends with bitwise the same weights on CPU:
- the data order of (global) epoch e is a permutation seeded by (seed, e) (`DistributedSampler`, also for one
  process), cut into batches; a resumed epoch skips the batches already done;
- every training item is produced with python/numpy/torch RNGs seeded by (seed, epoch, index), so random transforms
  give the same result in any DataLoader worker, and the main process's RNG (dropout) is left untouched;
- each checkpoint stores the RNG states of every rank, the optimiser and the schedule, and the position in the run;
- evaluation runs with the RNG states saved and restored around it.

Under `torchrun` (WORLD_SIZE > 1) the same code runs data-parallel: one process per device, DistributedSampler
shards, DistributedDataParallel averages gradients, and only rank 0 writes logs, checkpoints and results.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from vgstudy.checkpoint import (
    STATE_FILE,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    latest_checkpoint,
    load_into,
    load_state_dict,
    prune_checkpoints,
    safe_torch_load,
    save_state_dict,
    verify_checkpoint,
    write_checkpoint,
)
from vgstudy.errors import CheckpointError, ConfigError, VGStudyError
from vgstudy.evaluate import evaluate_model
from vgstudy.models.base import describe
from vgstudy.notebook import progress_bars_disabled
from vgstudy.seeding import seed_everything

SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "bf16", "off")
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
# Config fields that change what a run computes; a checkpoint resumes only a run with the same values.
_TRAJECTORY_FIELDS = ("stages", "batch_size", "weight_decay", "grad_clip", "seed", "amp")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Stage:
    """One phase of training, with its own trainable set and learning-rate schedule.

    name:            passed to `model.enter_stage(name)` when the stage starts (HiLoRA switches adapters there).
    epochs:          length of the stage, in passes over the training set.
    lr:              base learning rate; a parameter's is `lr * lr_scale[p]`, p the longest prefix of its name found
                     in `lr_scale` (1 when none), e.g. {"visual_backbone.": 0.1}.
    schedule:        the multiplier after warm-up, per optimiser step: "cosine" (from 1 towards 0 at the stage's end),
                     "step" (x `step_gamma` at each fraction of the stage in `step_milestones`), "constant".
    warmup_steps:    linear warm-up over the stage's first optimiser steps.
    """

    name: str
    epochs: int
    lr: float
    lr_scale: Mapping[str, float] = field(default_factory=dict)
    schedule: str = "cosine"
    warmup_steps: int = 0
    step_milestones: tuple[float, ...] = ()
    step_gamma: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_milestones", tuple(self.step_milestones))
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append(f"name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.epochs) or self.epochs < 1:
            problems.append(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not _is_number(self.lr) or not self.lr > 0:
            problems.append(f"lr must be a number > 0, got {self.lr!r}")
        if not all(isinstance(k, str) and _is_number(v) and v >= 0 for k, v in dict(self.lr_scale).items()):
            problems.append(f"lr_scale must map name prefixes to numbers >= 0, got {self.lr_scale!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            problems.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not all(_is_number(m) and 0 < m <= 1 for m in self.step_milestones):
            problems.append(f"step_milestones must be fractions of the stage in (0, 1], got {self.step_milestones!r}")
        if not _is_number(self.step_gamma) or not self.step_gamma > 0:
            problems.append(f"step_gamma must be a number > 0, got {self.step_gamma!r}")
        if problems:
            raise ConfigError(f"Stage {self.name!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the stages, and everything else that is not the model or the data.

    batch_size:              per process (the global batch is batch_size x number of processes).
    weight_decay:            AdamW's, for weight matrices; biases and norm weights get none.
    grad_clip:               max total gradient norm, or None for no clipping. None is the default because the
                             TransVG and HiVG releases both train with `--clip_max_norm 0.` (off); DETR's 0.1 is the
                             value people often remember.
    eval_every_epochs:       evaluate every n epochs (counted over all stages) and at the end; 0: only at the end.
    checkpoint_every_steps:  also checkpoint every n optimiser steps; 0: only at epoch ends (the last one included).
    log_every_steps:         one line of log.jsonl (mean losses, lr, samples/s) every n steps, and at each epoch
                             end and checkpoint (so a resumed run logs the same lines as an uninterrupted one).
    amp:                     "auto" (bf16 autocast on a CUDA device that supports it, fp32 otherwise), "bf16", "off".
    keep_checkpoints:        how many of the newest checkpoints to keep.
    find_unused_parameters:  DDP's flag: needed only when some trainable parameter gets no gradient in a step.
    """

    stages: tuple[Stage, ...]
    batch_size: int
    weight_decay: float = 1e-4
    grad_clip: float | None = None
    seed: int = 0
    num_workers: int = 0
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    log_every_steps: int = 10
    amp: str = "auto"
    keep_checkpoints: int = 2
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        problems = []
        if not isinstance(self.stages, tuple) or not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            problems.append(f"stages must be a non-empty tuple of Stage, got {self.stages!r}")
        for name, low in [
            ("batch_size", 1),
            ("seed", 0),
            ("num_workers", 0),
            ("eval_every_epochs", 0),
            ("checkpoint_every_steps", 0),
            ("log_every_steps", 1),
            ("keep_checkpoints", 1),
        ]:
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            problems.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or not self.grad_clip > 0):
            problems.append(f"grad_clip must be a number > 0 or None, got {self.grad_clip!r}")
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not isinstance(self.find_unused_parameters, bool):
            problems.append(f"find_unused_parameters must be a bool, got {self.find_unused_parameters!r}")
        if problems:
            raise ConfigError("TrainConfig: " + "; ".join(problems))


def lr_multiplier(stage: Stage, step: int, total_steps: int) -> float:
    """Factor on the stage's learning rates at its optimiser step `step` (0-based) of `total_steps`."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    if stage.schedule == "cosine":
        progress = min((step - stage.warmup_steps) / max(total_steps - stage.warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if stage.schedule == "step":
        return stage.step_gamma ** sum(step >= m * total_steps for m in stage.step_milestones)
    return 1.0


def parameter_groups(model: nn.Module, stage: Stage, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over `model`'s trainable parameters: one per (lr scale, decayed or not).

    Each group has "params", "lr" (stage.lr x scale), "weight_decay" and "lr_scale". A `lr_scale` prefix that names
    no parameter at all is a `ConfigError` (a typo must not silently train at the wrong rate).
    """
    named = list(model.named_parameters())
    unknown = [p for p in stage.lr_scale if not any(name.startswith(p) for name, _ in named)]
    if unknown:
        raise ConfigError(f"Stage {stage.name!r}: lr_scale prefixes {unknown} match no parameter name of the model")
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        prefix = max((p for p in stage.lr_scale if name.startswith(p)), key=len, default=None)
        scale = float(stage.lr_scale[prefix]) if prefix is not None else 1.0
        # No weight decay on biases and norm weights (1-D): pulling them to 0 only constrains offsets and scales.
        decayed = param.ndim > 1
        group = groups.setdefault(
            (scale, decayed),
            {"params": [], "lr": stage.lr * scale, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale},
        )
        group["params"].append(param)
    if not groups:
        raise ConfigError(f"Stage {stage.name!r}: the model has no trainable parameter in this stage")
    return list(groups.values())


# --- Random number generators ---------------------------------------------------------------------------------------


def _rng_state() -> dict:
    """python / numpy / torch (CPU and CUDA) RNG states, as JSON-ready values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


@contextlib.contextmanager
def _rng_isolated(seed: int | None = None) -> Iterator[None]:
    """Run a block with the python/numpy/torch-CPU RNGs seeded by `seed` (or as they are), then put them back."""
    python, numpy, torch_cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # CPU only: a CUDA dropout stream must not be reseeded
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_cpu)


class _SeededItems(Dataset):
    """The training set indexed by (epoch, index): each item is drawn with RNGs seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        item_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])
        with _rng_isolated(item_seed >> 1):  # >> 1: torch seeds are signed 64-bit
            return self.dataset[index]


# --- Processes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Processes:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # this Trainer initialised the process group, so it tears it down

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _join_processes(device: torch.device) -> _Processes:
    """Read torchrun's WORLD_SIZE / RANK / LOCAL_RANK and join the process group (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Processes()
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Processes(world_size, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), owns_group)


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "vgstudy": importlib.metadata.version("vgstudy"),
        "platform": platform.platform(),
    }


def _git_commit() -> str:
    """The commit of the working tree vgstudy is imported from, or "unknown" (no git, not a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _check_writable(run_dir: Path) -> None:
    """Create `run_dir` and write a probe file in it, so an unusable folder fails before any training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} cannot be created or written to: {e}") from e


def checkpoint_size_estimate(model: nn.Module) -> int:
    """Bytes of one checkpoint, at most: every tensor of the state dict plus AdamW's two moments per parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    return state + moments


def _check_free_space(run_dir: Path, needed: int) -> None:
    """Fail before training when the disk under `run_dir` cannot hold a checkpoint (written beside the last one)."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ConfigError(
            f"run_dir {run_dir}: {free / 2**20:.1f} MiB free on its disk, but a checkpoint needs about "
            f"{needed / 2**20:.1f} MiB (weights + optimiser state); free some space or choose another out_dir"
        )


@dataclass
class _Progress:
    """Where a run is; saved in every checkpoint's state.json. Counts are of work done."""

    step: int = 0  # optimiser steps, whole run
    stage_index: int = 0
    epoch_in_stage: int = 0  # epochs of the current stage done
    batch_in_epoch: int = 0  # batches of the current epoch done
    samples: int = 0  # training samples seen, all processes
    train_time_s: float = 0.0  # time in training steps (data loading included), earlier sessions included
    wall_time_s: float = 0.0  # time in fit(), earlier sessions up to their last checkpoint included
    last_metrics: dict = field(default_factory=dict)
    best: dict | None = None


class Trainer:
    """Trains any grounding model with any criterion: `Trainer(...).fit()` -> the results dict.

    model:      `model(images, texts) -> Output`; optional `model.enter_stage(name)` at each stage start.
    criterion:  `criterion(output, batch) -> {"loss": total, other scalar terms...}`.
    train_set:  map-style data set whose items `collate_fn` turns into a batch dict ("images", "texts",
                "boxes_cxcywh", ...); every tensor of the batch is moved to `device`.
    run_dir:    where log.jsonl, checkpoints/ and results.json go; created, and checked writable, here.
    eval_sets:  {split name: data set} evaluated with `vgstudy.evaluate.evaluate_model`; the first split's Acc@0.5
                picks the "best" evaluation.
    params:     the run's parameters, copied into results.json.

    After `fit`, `optimizer` and `scheduler` are those of the last stage.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Any, dict], dict[str, torch.Tensor]],
        train_set: Dataset,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        collate_fn: Callable[[list], dict],
        eval_sets: Mapping[str, Dataset] | None = None,
        device: str | torch.device = "cpu",
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.criterion = criterion
        self.train_set = train_set
        self.collate_fn = collate_fn
        self.eval_sets = dict(eval_sets or {})
        self.params = dict(params or {})
        self.run_dir = Path(run_dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "log.jsonl"

        device = torch.device(device)
        self.processes = _join_processes(device)
        if device.type == "cuda" and self.processes.distributed:
            device = torch.device("cuda", self.processes.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.processes.main:
            _check_writable(self.run_dir)

        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.bf16 = config.amp == "bf16" or (config.amp == "auto" and bf16_ok)
        per_process = math.ceil(len(train_set) / self.processes.world_size)
        self.steps_per_epoch = per_process // config.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(train_set)} samples: too few for one batch of batch_size="
                f"{config.batch_size} per process on {self.processes.world_size} process(es)"
            )

        if self.processes.main:
            _check_free_space(self.run_dir, checkpoint_size_estimate(model))
        self.model = model.to(device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._forward_model: nn.Module = self.model  # DistributedDataParallel(model) when distributed
        self._trainable: list[nn.Parameter] = []

    # --- The run ---------------------------------------------------------------------------------------------------

    def fit(self, resume: str | os.PathLike | bool = "auto") -> dict:
        """Train through every stage and return the results dict (also written to run_dir/results.json).

        resume="auto": continue from the newest checkpoint under run_dir that verifies (a newer corrupt one is
            reported and skipped); start fresh when there is none; `CheckpointError` when some exist but none verifies.
        resume=True: like "auto", but `CheckpointError` when there is nothing to resume.
        resume=False: start afresh; checkpoints, log and results already in run_dir are deleted (with a warning).
        resume=<path>: continue from that checkpoint folder (`run_dir/checkpoints/step-<N>`), which must verify.

        Resuming replays `enter_stage` up to the saved stage, so resume with a freshly built model (as after a crash),
        not with one that has already been through the stages.
        """
        self._session_start = time.perf_counter()
        progress, resumed_from = self._start(resume)
        self._wall_before = progress.wall_time_s  # time of earlier sessions, up to the checkpoint resumed from
        stages = self.config.stages
        while True:
            stage = stages[progress.stage_index]
            while progress.epoch_in_stage < stage.epochs:
                self._train_epoch(stage, progress)
                progress.epoch_in_stage += 1
                progress.batch_in_epoch = 0
                epochs_done = self._epochs_before(progress.stage_index) + progress.epoch_in_stage
                last = progress.stage_index == len(stages) - 1 and progress.epoch_in_stage == stage.epochs
                every = self.config.eval_every_epochs
                if self.eval_sets and (last or (every and epochs_done % every == 0)):
                    self._evaluate(progress)
                self._save_checkpoint(progress)
            if progress.stage_index == len(stages) - 1:
                break
            progress.stage_index += 1
            progress.epoch_in_stage = 0
            self._begin_stage(progress)

        progress.wall_time_s = self._wall_before + time.perf_counter() - self._session_start
        results = self._results(progress, resumed_from)
        if self.processes.main:
            atomic_write_json(self.run_dir / "results.json", results)
        if self.processes.distributed:
            shared = [results]
            dist.broadcast_object_list(shared, src=0)
            results = shared[0]
            if self.processes.owns_group:
                dist.destroy_process_group()
        return results

    def _epochs_before(self, stage_index: int) -> int:
        return sum(s.epochs for s in self.config.stages[:stage_index])

    def _start(self, resume: str | os.PathLike | bool) -> tuple[_Progress, str | None]:
        """Fresh start or resume; either way the model is in its stage and the optimiser is built."""
        error, path = None, None
        if self.processes.main:
            try:
                path = self._choose_checkpoint(resume)
            except (CheckpointError, ConfigError) as e:
                error = e
        if self.processes.distributed:
            # Rank 0 decides, so every process resumes from the same checkpoint (or fails with the same error).
            shared = [str(error) if error else None, str(path) if path else None]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None and error is None:
                error = CheckpointError(shared[0])
            path = Path(shared[1]) if shared[1] else None
        if error is not None:
            raise error
        if path is None:
            seed_everything(self.config.seed + self.processes.rank)
            progress = _Progress()
            self._log({"kind": "start", "step": 0, "world_size": self.processes.world_size})
            self._begin_stage(progress)
            return progress, None
        return self._load_checkpoint(path), str(path)

    def _choose_checkpoint(self, resume: str | os.PathLike | bool) -> Path | None:
        if resume is False:
            old = [p for p in (self.checkpoint_root, self.log_path, self.run_dir / "results.json") if p.exists()]
            if old:
                warnings.warn(f"resume=False: starting afresh in {self.run_dir}, deleting {old}", stacklevel=3)
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)
            (self.run_dir / "results.json").unlink(missing_ok=True)
            return None
        if resume is True or resume == "auto":
            path = latest_checkpoint(self.checkpoint_root)
            if path is None and resume is True:
                raise CheckpointError(f"resume=True, but {self.checkpoint_root} holds no checkpoint")
            return path
        if isinstance(resume, str | os.PathLike):
            verify_checkpoint(resume)
            return Path(resume)
        raise ConfigError(f"resume must be 'auto', True, False or a checkpoint folder, got {resume!r}")

    def _load_checkpoint(self, path: Path) -> _Progress:
        state = json.loads((path / STATE_FILE).read_text())
        saved = {k: state["config"].get(k) for k in _TRAJECTORY_FIELDS}
        current = json.loads(json.dumps(dataclasses.asdict(self.config), default=str))
        differing = [k for k in _TRAJECTORY_FIELDS if saved[k] != current[k]]
        if differing or state["world_size"] != self.processes.world_size:
            raise CheckpointError(
                f"checkpoint {path} belongs to a different run: config fields {differing} differ"
                f" (saved world size {state['world_size']}, now {self.processes.world_size})"
            )
        try:
            progress = _Progress(**{f.name: state[f.name] for f in dataclasses.fields(_Progress)})
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lacks {e} (written by another vgstudy?)") from e
        # Rebuild the module structure of the saved stage (adapters added, merged...) before loading weights.
        for stage in self.config.stages[: progress.stage_index + 1]:
            self._enter_stage(stage)
        load_into(self.model, load_state_dict(path / MODEL_FILE), strict=True)
        self._begin_stage(progress, enter=False)
        training = safe_torch_load(path / OPTIMIZER_FILE)
        try:
            self.optimizer.load_state_dict(training["optimizer"])
            self.scheduler.load_state_dict(training["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"optimiser state in {path / OPTIMIZER_FILE} does not fit this model: {e}") from e
        _set_rng_state(state["rng"][self.processes.rank])
        if self.processes.main:
            self._truncate_log(progress.step)
        self._log({"kind": "resume", "step": progress.step, "checkpoint": str(path)})
        return progress

    def _enter_stage(self, stage: Stage) -> None:
        enter = getattr(self.model, "enter_stage", None)
        if callable(enter):
            enter(stage.name)
        self.model.to(self.device)  # a stage may have added modules

    def _begin_stage(self, progress: _Progress, enter: bool = True) -> None:
        """Enter the stage, then build DDP, the optimiser and the per-step schedule over what is now trainable."""
        stage = self.config.stages[progress.stage_index]
        if enter:
            self._enter_stage(stage)
        groups = parameter_groups(self.model, stage, self.config.weight_decay)
        self._trainable = [p for g in groups for p in g["params"]]
        if self.processes.distributed:
            # Re-wrapped per stage: DDP registers the parameters that require grad when it is built.
            self._forward_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.find_unused_parameters,
            )
        fused = True if self.device.type == "cuda" else None
        self.optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=self.config.weight_decay, fused=fused)
        total = self.steps_per_epoch * stage.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(stage, s, total))
        if enter:
            counts = describe(self.model)
            self._log(
                {
                    "kind": "stage",
                    "step": progress.step,
                    "stage": stage.name,
                    "total": counts["total"],
                    "trainable": counts["trainable"],
                }
            )

    # --- One epoch -------------------------------------------------------------------------------------------------

    def _train_loader(self, epoch: int, skip: int) -> DataLoader:
        """Batches `skip`.. of global epoch `epoch`, in an order that depends only on (seed, epoch, process)."""
        sampler = DistributedSampler(
            self.train_set,
            num_replicas=self.processes.world_size,
            rank=self.processes.rank,
            shuffle=True,
            seed=self.config.seed,
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)
        size = self.config.batch_size
        # The last incomplete batch is dropped (as in TransVG), so every process makes the same number of steps.
        batches = [[(epoch, i) for i in indices[b * size : (b + 1) * size]] for b in range(skip, self.steps_per_epoch)]
        return DataLoader(
            _SeededItems(self.train_set, self.config.seed),
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: making the loader must not draw from the global RNG (items are seeded anyway).
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _train_epoch(self, stage: Stage, progress: _Progress) -> None:
        epoch = self._epochs_before(progress.stage_index) + progress.epoch_in_stage
        stage_steps = self.steps_per_epoch * stage.epochs
        loader = self._train_loader(epoch, skip=progress.batch_in_epoch)
        quiet = not self.processes.main or progress_bars_disabled()
        bar_options = {"disable": True} if quiet else {}
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=progress.batch_in_epoch,
            desc=f"{stage.name} {progress.epoch_in_stage + 1}/{stage.epochs}",
            **bar_options,
        )
        self._forward_model.train()
        window: dict[str, torch.Tensor] = {}
        window_steps, window_time = 0, 0.0
        tick = time.perf_counter()
        for batch in loader:
            batch = self._to_device(batch)
            step_in_stage = progress.epoch_in_stage * self.steps_per_epoch + progress.batch_in_epoch
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                output = self._forward_model(batch["images"], batch["texts"])
                terms = self.criterion(output, batch)
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self._trainable, self.config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()

            progress.step += 1
            progress.batch_in_epoch += 1
            progress.samples += len(batch["texts"]) * self.processes.world_size
            for name, value in terms.items():
                window[name] = window.get(name, 0.0) + value.detach().float()
            window_steps += 1
            now = time.perf_counter()
            window_time += now - tick
            progress.train_time_s += now - tick
            tick = now
            bar.update()

            epoch_end = progress.batch_in_epoch == self.steps_per_epoch
            every = self.config.checkpoint_every_steps
            save_now = bool(every) and progress.step % every == 0 and not epoch_end
            # Also log before each checkpoint and at epoch ends, so a resumed run logs exactly the same lines.
            if progress.step % self.config.log_every_steps == 0 or save_now or epoch_end:
                means = self._mean_over_processes({k: v / window_steps for k, v in window.items()})
                if not math.isfinite(means["loss"]):
                    raise VGStudyError(
                        f"the loss is {means['loss']} at step {progress.step} (stage {stage.name!r}, epoch "
                        f"{epoch + 1}): lower the learning rate or set grad_clip"
                    )
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                samples = window_steps * self.config.batch_size * self.processes.world_size
                self._log(
                    {
                        "kind": "train",
                        "step": progress.step,
                        "epoch": epoch + progress.batch_in_epoch / self.steps_per_epoch,
                        "stage": stage.name,
                        "lr": stage.lr * lr_multiplier(stage, step_in_stage, stage_steps),
                        **means,
                        "samples_per_s": samples / max(window_time, 1e-9),
                    }
                )
                window, window_steps, window_time = {}, 0, 0.0
            if save_now:
                self._save_checkpoint(progress)
                tick = time.perf_counter()
        bar.close()

    def _mean_over_processes(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(values)
        stacked = torch.stack([values[n] for n in names])
        if self.processes.distributed:
            dist.all_reduce(stacked)
            stacked /= self.processes.world_size
        return dict(zip(names, stacked.tolist(), strict=True))

    def _evaluate(self, progress: _Progress) -> None:
        """Evaluate every split on rank 0 (the others wait), without touching the training RNG streams."""
        if self.processes.main:
            metrics = {}
            with _rng_isolated(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                for split, dataset in self.eval_sets.items():
                    metrics[split] = evaluate_model(
                        self.model,
                        dataset,
                        collate_fn=self.collate_fn,
                        batch_size=self.config.batch_size,
                        device=self.device,
                        num_workers=self.config.num_workers,
                    )
            epoch = self._epochs_before(progress.stage_index) + progress.epoch_in_stage
            progress.last_metrics = metrics
            first = next(iter(metrics))
            if progress.best is None or metrics[first]["acc50"] > progress.best["metrics"][first]["acc50"]:
                progress.best = {"split": first, "step": progress.step, "epoch": epoch, "metrics": metrics}
            stage = self.config.stages[progress.stage_index].name
            self._log({"kind": "eval", "step": progress.step, "epoch": epoch, "stage": stage, **metrics})
        if self.processes.distributed:
            dist.barrier()

    # --- Checkpoints, logs, results --------------------------------------------------------------------------------

    def _save_checkpoint(self, progress: _Progress) -> None:
        """Write checkpoints/step-<N>/ atomically (rank 0), with every process's RNG state; keep the newest few."""
        progress.wall_time_s = self._wall_before + time.perf_counter() - self._session_start
        rng = [_rng_state()]
        if self.processes.distributed:
            rng = [None] * self.processes.world_size
            dist.all_gather_object(rng, _rng_state())
        if self.processes.main:
            state = {
                "format": 1,
                **dataclasses.asdict(progress),
                "stage": self.config.stages[progress.stage_index].name,
                "world_size": self.processes.world_size,
                "rng": rng,
                "config": dataclasses.asdict(self.config),
                "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }

            def write_files(folder: Path) -> None:
                # All of the state dict, frozen parts and adapter keys included, so a resumed run is exact.
                save_state_dict(folder / MODEL_FILE, self.model.state_dict())
                training = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
                atomic_torch_save(folder / OPTIMIZER_FILE, training)

            try:
                write_checkpoint(self.checkpoint_root, progress.step, write_files, state)
            except OSError as e:  # a full disk, a quota, a vanished folder: the earlier checkpoints are untouched
                raise CheckpointError(
                    f"checkpoint step-{progress.step} could not be written into {self.checkpoint_root}: {e}; the "
                    f"earlier checkpoints there are intact and the run resumes from the newest once this is fixed"
                ) from e
            prune_checkpoints(self.checkpoint_root, self.config.keep_checkpoints)
        if self.processes.distributed:
            dist.barrier()

    def _log(self, record: dict) -> None:
        """Append one JSON line to run_dir/log.jsonl (rank 0 only)."""
        if not self.processes.main:
            return
        record = {**record, "time": round(time.time(), 3)}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop the log lines written after the checkpoint we resume from, so no step is logged twice."""
        if not self.log_path.exists():
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_bytes(self.log_path, "".join(kept).encode())

    def _results(self, progress: _Progress, resumed_from: str | None) -> dict:
        counts = describe(self.model)
        return {
            "params": self.params,
            "config": dataclasses.asdict(self.config),
            "metrics": progress.last_metrics,
            "best": progress.best,
            "parameters": {"total": counts["total"], "trainable": counts["trainable"]},
            "steps": progress.step,
            "epochs": self._epochs_before(len(self.config.stages)),
            "samples_seen": progress.samples,
            "train_time_s": progress.train_time_s,
            "wall_time_s": progress.wall_time_s,
            "samples_per_s": progress.samples / max(progress.train_time_s, 1e-9),
            "seed": self.config.seed,
            "device": str(self.device),
            "world_size": self.processes.world_size,
            "resumed_from": resumed_from,
            "versions": _versions(),
            "git_commit": _git_commit(),
        }
