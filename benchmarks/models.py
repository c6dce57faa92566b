"""Model benchmarks at random weights: training step time, inference throughput, peak memory and FLOPs per model.

    .venv/bin/python benchmarks/models.py [--models transvg-r50,hivg-b,...] [--batch-sizes 1,2] [--steps 2]
        [--budget-s 540] [--device auto|cpu|cuda] [--threads 1] [--in-process] [--quick]
        [--data-json runs/bench/models/data.json] [--out runs/bench/models]

Measures, for each model and batch size, after one untimed warm-up step:
  inference  forward under `torch.inference_mode` (tokenisation included): seconds per batch and samples/s;
  training   forward + BoxCriterion (L1 + GIoU, the same loss for every model, so they compare) + backward + AdamW
             step over the parameters the model trains as built: seconds per step and samples/s.
FLOPs per sample, of the forward and of forward + backward, are counted during the warm-up of the first (smallest
batch) training measurement (`torch.utils.flop_counter.FlopCounterMode`: 2 per multiply-add of matmuls,
convolutions and attention).
Peak memory is per measurement (warm-up + timed steps): on CUDA `torch.cuda.max_memory_allocated` (weights, gradients,
optimiser state and activations); on CPU the peak resident set size (Linux VmHWM, reset before each measurement)
above the process's size before the model was built -- the same things plus the allocator's and libraries'
working memory, which is what a CPU run really needs. Each model runs in a fresh subprocess (unless --in-process) so
no model inherits another's memory. `×` columns are ratios to the TransVG baseline of the same size (transvg-r50
for paper-size models, transvg-tiny for the small configs) at the same batch, both measured in this run.

CUDA, when available (or --device cuda), runs under bf16 autocast; the CPU runs in float32. `--budget-s` bounds the
whole run: each model gets the time left divided by the models left, and within it a further batch size or timed
step is skipped (and reported as such) when the previous step says it will not fit; the smallest batch of each
mode always runs. --quick: the small configs at batch 2, one timed step, for a smoke test.
Writes results.json and results.md under --out and prints the Markdown table. `--data-json` folds a
`benchmarks/data_throughput.py` result into both (data loading: decode + augmentation, samples/s per worker).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vgstudy.compare import Deadline, PeakMemory, StepRunner, measure, measurement_batch, uses_bf16
from vgstudy.errors import ConfigError

# The study's four methods: paper size first in each group's baseline, then the small configs that the tiny profile
# trains. EpmVG-R is included where its names are registered.
PAPER_MODELS = ("transvg-r50", "hivg-b", "mapper-b", "epmvg-r-r50")
SMALL_MODELS = ("transvg-tiny", "hivg-tiny", "mapper-tiny", "epmvg-r-tiny")
BASELINES = {"paper": "transvg-r50", "small": "transvg-tiny"}
# Batch sizes per (device type, size group): a couple of points each, within minutes on 2 CPU cores.
DEFAULT_BATCH_SIZES = {
    ("cpu", "paper"): (1, 2),
    ("cpu", "small"): (8, 32),
    ("cuda", "paper"): (8, 32),
    ("cuda", "small"): (32, 128),
}
DEFAULT_STEPS = {"paper": 2, "small": 3}
VERSIONED_PACKAGES = ("torch", "torchvision", "open_clip_torch", "timm", "transformers", "peft", "numpy", "vgstudy")
MODES = ("inference", "training")


def size_group(name: str) -> str:
    """ "small" for the tiny configs, "paper" otherwise."""
    return "small" if "tiny" in name else "paper"


def plan_models(requested: Sequence[str] | None, registered: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(models to measure, {model: why skipped}).

    With no request, the study's models that are registered, small configs first; the others are skipped with a
    note. A requested name that is not registered is a ConfigError (a typo must not pass as a skip).
    """
    if requested:
        unknown = [name for name in requested if name not in registered]
        if unknown:
            raise ConfigError(f"--models: unknown {unknown}; registered: {', '.join(registered)}")
        return list(dict.fromkeys(requested)), {}
    wanted = SMALL_MODELS + PAPER_MODELS
    skipped = {name: "not registered in vgstudy.models" for name in wanted if name not in registered}
    return [name for name in wanted if name in registered], skipped


def parse_names(text: str) -> list[str]:
    return [name for name in re.split(r"[,\s]+", text) if name]


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(value) for value in parse_names(text))
    except ValueError as e:
        raise ConfigError(f"--batch-sizes {text!r}: expected integers separated by commas") from e
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes {text!r}: expected at least one integer >= 1")
    return tuple(sorted(set(sizes)))


# --- Machine and memory -----------------------------------------------------------------------------------------


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (use --device auto or cpu)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def machine_info(device: torch.device, threads: int, load_at_start: Sequence[float] | None) -> dict:
    """Where the figures come from: CPU, cores, threads, load (other processes slow a shared CPU), GPU, versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_1_5_15_min": {"start": load_at_start, "end": load_average()},
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": "bfloat16 autocast" if uses_bf16(device) else "float32",
        "versions": versions,
    }
    return info


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# --- One model --------------------------------------------------------------------------------------------------


def input_batches(model: torch.nn.Module, batch_sizes: Sequence[int], device: torch.device) -> dict[int, dict]:
    """SynthRef samples through the model's own eval transform, one collated batch per size, on `device`."""
    from vgstudy.data import SynthRef

    samples = SynthRef("train", max(batch_sizes), seed=0)
    return {size: measurement_batch(model, samples, size, device) for size in batch_sizes}


def measure_model(
    name: str,
    batch_sizes: Sequence[int],
    steps: int,
    device: torch.device,
    budget_s: float | None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every measurement of one model: per batch size, inference then training, smallest batch first.

    A measurement after the first of its mode is skipped when the previous step's time, scaled by the batch, says
    that its warm-up and one timed step would overrun the model's budget; within a measurement, timed steps stop
    when the next would.
    """
    from vgstudy.models import build, describe, model_names
    from vgstudy.seeding import seed_everything

    deadline = Deadline(budget_s)
    model_names()  # import the method modules before the baseline, so it counts the model, not the code
    memory = PeakMemory(device)
    memory.set_baseline()
    seed_everything(0, deterministic=False)
    build_start = time.perf_counter()
    model = build(name).to(device)
    build_s = time.perf_counter() - build_start
    model_mb = memory.current_mb() - memory.baseline_mb
    counts = describe(model)
    batches = input_batches(model, batch_sizes, device)
    log(f"built in {build_s:.1f} s: {counts['total']:,} parameters ({counts['trainable']:,} trainable)")

    runner = StepRunner(model, device)
    entry = {
        "name": name,
        "group": size_group(name),
        "status": "ok",
        "parameters": {"total": counts["total"], "trainable": counts["trainable"]},
        "image_size": model.transform.image_size,
        "build_s": build_s,
        "built_model_mb": model_mb,
        "flops_per_sample": {},  # counted in the warm-up of the first training measurement
        "measurements": [],
        "skipped": [],
    }
    last: dict[str, dict] = {}
    for size in batch_sizes:
        for mode in MODES:
            previous = last.get(mode)
            if previous is not None:
                predicted = 2 * previous["step_s"] * size / previous["batch"]
                if not deadline.fits(predicted):
                    entry["skipped"].append(
                        {"mode": mode, "batch": size, "why": f"over the time budget (~{predicted:.0f} s)"}
                    )
                    log(f"{mode} batch {size}: skipped, ~{predicted:.0f} s would overrun the time budget")
                    continue
            flops = entry["flops_per_sample"] if mode == "training" and previous is None else None
            result = measure(runner, memory, mode, batches[size], steps, deadline, log, flops)
            entry["measurements"].append(result)
            last[mode] = result
    return entry


# --- The run ----------------------------------------------------------------------------------------------------


def add_ratios(models: list[dict]) -> None:
    """`x_baseline` on every measurement: its step time over the same-size TransVG's at the same mode and batch."""
    by_name = {entry["name"]: entry for entry in models if entry["status"] == "ok"}
    for entry in by_name.values():
        baseline = by_name.get(BASELINES[entry["group"]])
        reference = {(m["mode"], m["batch"]): m["step_s"] for m in baseline["measurements"]} if baseline else {}
        for m in entry["measurements"]:
            base = reference.get((m["mode"], m["batch"]))
            m["x_baseline"] = m["step_s"] / base if base else None


def data_loader_rows(path: Path) -> dict | None:
    """A data_throughput.py result, with samples/s per worker (the main process counts as one worker)."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        rows = report["samples_per_s"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"--data-json {path}: not a data_throughput.py result ({e})") from e
    table = []
    for label, value in rows.items():
        workers = re.search(r"(\d+) workers?", label)
        processes = max(1, int(workers.group(1))) if workers else 1
        table.append({"measurement": label, "samples_per_s": value, "per_worker": value / processes})
    return {"source": str(path), "settings": report.get("machine", {}), "rows": table}


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(report: dict) -> str:
    """The results as Markdown: the machine and settings, one row per measurement, skips, the data loader."""
    machine, settings = report["machine"], report["settings"]
    load = machine["load_average_1_5_15_min"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        "# Model benchmarks (random weights)",
        "",
        f"- machine: {machine['cpu']} ({machine['cpu_count']} cores, {machine['threads']} torch thread(s)), "
        f"{machine['platform']}" + (f"; GPU {machine['gpu']} (CUDA {machine['cuda']})" if machine["gpu"] else ""),
        f"- device {machine['device']}, dtype {machine['dtype']}; {versions}",
        f"- load average (1 min) at start / end: {_load(load['start'])} / {_load(load['end'])}",
        f"- memory: {settings['memory']}; FLOPs: {settings['flops']}",
        f"- {settings['isolation']}; budget {_fmt(settings['budget_s'], '.0f')} s, wall {report['wall_s']:.0f} s",
        "- × TransVG: step time over the same-size TransVG's (transvg-r50 / transvg-tiny), same mode and batch, "
        "this run",
        "",
        "| model | params M (trainable) | px | GFLOPs/sample fwd / fwd+bwd | mode | batch | s/step (steps) "
        "| samples/s | peak MiB | × TransVG |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for entry in report["models"]:
        if entry["status"] != "ok":
            notes.append(f"- {entry['name']}: {entry['status']} -- {entry['note']}")
            continue
        params = entry["parameters"]
        flops = entry["flops_per_sample"]
        gflops = f"{_fmt(_giga(flops.get('inference')), '.1f')} / {_fmt(_giga(flops.get('training')), '.1f')}"
        for m in entry["measurements"]:
            lines.append(
                f"| {entry['name']} | {params['total'] / 1e6:.1f} ({params['trainable'] / 1e6:.1f}) "
                f"| {entry['image_size']} | {gflops} | {m['mode']} | {m['batch']} | {m['step_s']:.3f} ({m['steps']}) "
                f"| {m['samples_per_s']:.1f} | {m['peak_mb']:,.0f} | {_fmt(m['x_baseline'], '.2f')} |"
            )
        for skip in entry["skipped"]:
            notes.append(f"- {entry['name']} {skip['mode']} batch {skip['batch']}: skipped, {skip['why']}")
    if notes:
        lines += ["", "Not measured:", "", *notes]
    data = report.get("data_loader")
    if data:
        settings = data["settings"]
        lines += [
            "",
            f"## Data loading: SynthRef decode + augmentation ({settings.get('n', '?')} samples, "
            f"{settings.get('image_size', '?')} px, batch {settings.get('batch_size', '?')})",
            "",
            "| measurement | samples/s | samples/s per worker |",
            "|---|---|---|",
            *(f"| {r['measurement']} | {r['samples_per_s']:,.0f} | {r['per_worker']:,.0f} |" for r in data["rows"]),
        ]
    return "\n".join(lines) + "\n"


def _load(averages: Sequence[float] | None) -> str:
    return "–" if not averages else f"{averages[0]:.1f}"


def _giga(flops: float | None) -> float | None:
    return None if flops is None else flops / 1e9


def run_in_subprocess(name: str, args: argparse.Namespace, batch_sizes: Sequence[int], steps: int, budget_s) -> dict:
    """`measure_model` in a fresh interpreter, so its memory figures are its own; an error becomes a failed entry."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            name,
            "--result",
            str(result),
            "--batch-sizes",
            ",".join(map(str, batch_sizes)),
            "--steps",
            str(steps),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        if budget_s is not None:
            command += ["--model-budget-s", str(budget_s)]
        # The limit only stops a hung child; budgets keep a working one far inside it.
        limit = None if budget_s is None else 3 * budget_s + 600
        try:
            completed = subprocess.run(command, timeout=limit, check=False)
            code = completed.returncode
        except subprocess.TimeoutExpired:
            code = f"killed after {limit:.0f} s"
        if code == 0 and result.is_file():
            return json.loads(result.read_text())
    return {"name": name, "group": size_group(name), "status": "failed", "note": f"the measurement exited {code}"}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=parse_names, default=None, help="comma-separated names (default: the study's)")
    parser.add_argument("--batch-sizes", type=parse_batch_sizes, default=None, help="e.g. 1,2 (default: per size)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 2 / 3)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole run; 0: no limit")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    # One thread by default: figures that compare across machines and hold up on a shared, loaded CPU.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--in-process", action="store_true", help="measure every model in this process")
    parser.add_argument("--quick", action="store_true", help="small configs, batch 2, one step: a smoke test")
    parser.add_argument("--data-json", type=Path, default=None, help="a data_throughput.py result to include")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/models"))
    # The subprocess side: measure this one model within its share of the budget (0 is a share, not "no limit").
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: expected an integer >= 1")
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: expected an integer >= 1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    budget_s = args.budget_s or None

    if args.one:
        log = functools.partial(print, f"[{args.one}]", flush=True)
        entry = measure_model(args.one, args.batch_sizes, args.steps, device, args.model_budget_s, log=log)
        args.result.write_text(json.dumps(entry))
        return entry

    from vgstudy.models import model_names

    start, load_at_start = time.perf_counter(), load_average()
    requested = args.models
    if args.quick and not requested:
        requested = [name for name in SMALL_MODELS if name in model_names()]
    names, skipped = plan_models(requested, model_names())
    models = []
    for index, name in enumerate(names):
        group = size_group(name)
        batch_sizes = args.batch_sizes or ((2,) if args.quick else DEFAULT_BATCH_SIZES[device.type, group])
        steps = args.steps or (1 if args.quick else DEFAULT_STEPS[group])
        share = None
        if budget_s is not None:  # the time left, shared among the models left
            share = max(budget_s - (time.perf_counter() - start), 0.0) / (len(names) - index)
        print(f"== {name}: batch sizes {list(batch_sizes)}, {steps} steps, budget {_fmt(share, '.0f')} s", flush=True)
        if args.in_process:
            entry = measure_model(
                name, batch_sizes, steps, device, share, log=functools.partial(print, f"[{name}]", flush=True)
            )
        else:
            entry = run_in_subprocess(name, args, batch_sizes, steps, share)
        models.append(entry)
    models += [{"name": n, "group": size_group(n), "status": "skipped", "note": why} for n, why in skipped.items()]
    add_ratios(models)

    memory = PeakMemory(device)
    report = {
        "machine": machine_info(device, args.threads, load_at_start),
        "settings": {
            "budget_s": budget_s,
            "quick": args.quick,
            "isolation": "in one process" if args.in_process else "a fresh subprocess per model",
            "memory": memory.method,
            "flops": "FlopCounterMode on the smallest batch's training warm-up (matmul, conv, attention), per sample",
            "loss": "BoxCriterion (L1 + GIoU) for every model",
            "optimizer": "AdamW over the parameters each model trains as built",
        },
        "models": models,
        "data_loader": data_loader_rows(args.data_json) if args.data_json else None,
        "wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    failed = [entry["name"] for entry in models if entry["status"] == "failed"]
    if failed:
        raise SystemExit(f"benchmarks failed for {failed}")
    return report


if __name__ == "__main__":
    main()
