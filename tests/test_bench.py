"""benchmarks/models.py: the plan of models, the ratios, the data-loader rows, and a --quick run's JSON and Markdown.

Speed is never asserted; these tests check that every figure is computed, consistent and reported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._toy import IMAGE_SIZE, ToyGroundingModel
from vgstudy.data import TransformConfig
from vgstudy.errors import ConfigError
from vgstudy.models import registry

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "models.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture
def keep_threads():
    """main() sets torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_registered(monkeypatch):
    """A registered toy model (a few thousand parameters) with the `transform` every vgstudy model carries."""

    def toy_tiny(**overrides):
        model = ToyGroundingModel(**overrides)
        model.transform = TransformConfig(image_size=IMAGE_SIZE)
        return model

    monkeypatch.setitem(registry._FACTORIES, "toy-tiny", toy_tiny)
    return "toy-tiny"


def test_plan_skips_unregistered_study_models_and_refuses_unknown_requests():
    registered = ["hivg-b", "hivg-tiny", "mapper-b", "mapper-tiny", "transvg-r50", "transvg-tiny"]
    names, skipped = bench.plan_models(None, registered)
    assert names == ["transvg-tiny", "hivg-tiny", "mapper-tiny", "transvg-r50", "hivg-b", "mapper-b"]
    assert set(skipped) == {"epmvg-r-tiny", "epmvg-r-r50"}
    assert all("not registered" in why for why in skipped.values())

    names, skipped = bench.plan_models(["hivg-b", "hivg-b", "transvg-tiny"], registered)
    assert (names, skipped) == (["hivg-b", "transvg-tiny"], {})
    with pytest.raises(ConfigError, match="hvig-b"):
        bench.plan_models(["hvig-b"], registered)


def test_cli_values_are_checked():
    assert bench.parse_batch_sizes("8, 2,8") == (2, 8)
    for bad in ("", "0,2", "two"):
        with pytest.raises(ConfigError, match="--batch-sizes"):
            bench.parse_batch_sizes(bad)
    assert bench.size_group("epmvg-r-tiny") == "small" and bench.size_group("mapper-b") == "paper"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            bench.resolve_device("cuda")
        assert bench.resolve_device("auto").type == "cpu"


def test_ratios_are_to_the_same_size_transvg_at_the_same_mode_and_batch():
    def entry(name, *measurements):
        keys = ("mode", "batch", "step_s")
        return {"name": name, "group": bench.size_group(name), "status": "ok", "measurements": [
            dict(zip(keys, m, strict=True)) for m in measurements
        ]}  # fmt: skip

    models = [
        entry("transvg-tiny", ("inference", 8, 0.5), ("training", 8, 2.0)),
        entry("hivg-tiny", ("inference", 8, 1.0), ("training", 8, 3.0), ("training", 32, 9.0)),
        entry("hivg-b", ("inference", 1, 4.0)),  # no transvg-r50 in this run: no ratio
        {"name": "epmvg-r-r50", "group": "paper", "status": "skipped", "note": "not registered"},
    ]
    bench.add_ratios(models)
    assert [m["x_baseline"] for m in models[0]["measurements"]] == [1.0, 1.0]
    assert [m["x_baseline"] for m in models[1]["measurements"]] == [2.0, 1.5, None]
    assert models[2]["measurements"][0]["x_baseline"] is None


def test_data_loader_rows_count_samples_per_worker(tmp_path):
    path = tmp_path / "data.json"
    rows = {"SynthRef generation, 1 process": 300.0, "loader with augmentation, 0 workers": 200.0}
    rows["loader with augmentation, 2 workers"] = 360.0
    path.write_text(json.dumps({"machine": {"n": 64, "image_size": 128, "batch_size": 32}, "samples_per_s": rows}))
    data = bench.data_loader_rows(path)
    assert [r["per_worker"] for r in data["rows"]] == [300.0, 200.0, 180.0]
    assert bench.data_loader_rows(tmp_path / "missing.json") is None
    path.write_text("{}")
    with pytest.raises(ConfigError, match="data.json"):
        bench.data_loader_rows(path)


def test_quick_run_in_process_writes_consistent_json_and_markdown(tmp_path, toy_registered, keep_threads):
    out = tmp_path / "bench"
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"machine": {"n": 64}, "samples_per_s": {"loader with augmentation, 2 workers": 50.0}}))
    argv = ["--quick", "--models", toy_registered, "--in-process", "--threads", "1", "--device", "cpu"]
    report = bench.main([*argv, "--steps", "2", "--data-json", str(data), "--out", str(out)])

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(report))
    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["dtype"] == "float32" and machine["threads"] == 1
    assert machine["versions"]["torch"] == torch.__version__.split("+")[0]
    (entry,) = report["models"]
    assert entry["status"] == "ok" and entry["image_size"] == IMAGE_SIZE
    model = ToyGroundingModel()
    assert entry["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert entry["parameters"]["trainable"] == entry["parameters"]["total"] - 1  # the frozen pixel scale
    flops = entry["flops_per_sample"]
    assert 0 < flops["inference"] < flops["training"]  # the backward adds the gradients' matmuls

    assert [(m["mode"], m["batch"]) for m in entry["measurements"]] == [("inference", 2), ("training", 2)]
    for m in entry["measurements"]:
        assert m["steps"] == len(m["step_times_s"]) == 2
        assert m["step_s"] == pytest.approx(sorted(m["step_times_s"])[0] / 2 + sorted(m["step_times_s"])[1] / 2)
        assert m["samples_per_s"] == pytest.approx(2 / m["step_s"])
        assert math.isfinite(m["peak_mb"]) and m["warmup_s"] > 0
        assert m["x_baseline"] is None  # transvg-tiny was not measured in this run
    assert report["data_loader"]["rows"] == [
        {"measurement": "loader with augmentation, 2 workers", "samples_per_s": 50.0, "per_worker": 25.0}
    ]

    markdown = (out / "results.md").read_text()
    assert markdown == bench.render_markdown(report)
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {toy_registered} |")]
    assert len(rows) == 2 and all(row.count("|") == header.count("|") for row in rows)
    assert "| inference | 2 |" in rows[0] and "| training | 2 |" in rows[1]
    assert "float32" in markdown and "samples/s per worker" in markdown and "| 25 |" in markdown


def test_a_budget_skips_larger_batches_and_says_so(tmp_path, toy_registered, keep_threads):
    argv = ["--models", toy_registered, "--in-process", "--threads", "1", "--batch-sizes", "2,16", "--steps", "3"]
    report = bench.main([*argv, "--budget-s", "1e-6", "--out", str(tmp_path)])
    (entry,) = report["models"]
    # The smallest batch of each mode always runs (one timed step, the budget is spent); the larger one is skipped.
    assert [(m["mode"], m["batch"], m["steps"]) for m in entry["measurements"]] == [
        ("inference", 2, 1),
        ("training", 2, 1),
    ]
    assert [(s["mode"], s["batch"]) for s in entry["skipped"]] == [("inference", 16), ("training", 16)]
    markdown = (tmp_path / "results.md").read_text()
    assert f"- {toy_registered} training batch 16: skipped, over the time budget" in markdown

    # A subprocess's share of the budget can be 0 s, which must mean "the minimum", never "no limit".
    result = tmp_path / "one.json"
    argv = ["--one", toy_registered, "--model-budget-s", "0", "--batch-sizes", "2,16", "--steps", "3"]
    bench.main([*argv, "--threads", "1", "--result", str(result)])
    entry = json.loads(result.read_text())
    assert [(m["batch"], m["steps"]) for m in entry["measurements"]] == [(2, 1), (2, 1)]
    assert len(entry["skipped"]) == 2


@pytest.mark.slow
def test_cli_quick_on_a_real_model_in_a_subprocess_per_model(tmp_path):
    """The path `make bench` takes: the CLI, one fresh interpreter per model, a real small config."""
    command = [sys.executable, str(SCRIPT), "--quick", "--models", "transvg-tiny", "--out", str(tmp_path)]
    subprocess.run(command, cwd=REPO, check=True, timeout=600)
    report = json.loads((tmp_path / "results.json").read_text())
    (entry,) = report["models"]
    assert entry["status"] == "ok" and report["settings"]["isolation"] == "a fresh subprocess per model"
    inference, training = entry["measurements"]
    assert [m["x_baseline"] for m in (inference, training)] == [1.0, 1.0]  # transvg-tiny is its own baseline
    assert training["peak_mb"] > inference["peak_mb"] > 0  # gradients and AdamW state on top of the activations
    assert entry["flops_per_sample"]["training"] > 2 * entry["flops_per_sample"]["inference"]
