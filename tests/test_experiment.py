"""The shared notebook helpers (vgstudy.experiment), notebook 01's parameter schema, the parameter files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vgstudy import study
from vgstudy.config import BackbonesParams, DataParams, load
from vgstudy.errors import ConfigError
from vgstudy.evaluate import BASELINES
from vgstudy.experiment import baselines, eval_split_names, grounding_data, train_and_evaluate
from vgstudy.models import build
from vgstudy.train import Stage

PARAMS_DIR = Path(__file__).resolve().parents[1] / "notebooks" / "params"


def test_synthref_data_has_the_three_report_splits():
    params = load({"n_train": 6, "n_eval": 3}, DataParams)
    train, evals = grounding_data(params)
    assert len(train) == 6 and list(evals) == ["val", "testA", "testB"]
    assert all(len(data) == 3 for data in evals.values())
    assert evals["testA"][0].family == "attribute"


@pytest.mark.parametrize(("dataset", "splits"), [("unc", ("val", "testA", "testB")), ("gref", ("val",))])
def test_real_data_sets_report_their_held_out_splits(dataset, splits):
    params = dataclasses.replace(load({}, DataParams), dataset=dataset)
    assert eval_split_names(params) == splits


def test_baselines_cover_every_split_and_the_object_ones_need_scenes():
    _, evals = grounding_data(load({"n_train": 2, "n_eval": 20}, DataParams))
    floors = baselines(evals)
    assert set(floors) == set(BASELINES)
    assert all(set(per_split) == {"val", "testA", "testB"} for per_split in floors.values())
    assert all(per_split["val"] == 0.0 for name, per_split in floors.items() if name == "centre box")
    stripped = {split: [dataclasses.replace(s, scene=None) for s in data] for split, data in evals.items()}
    assert set(baselines(stripped)) == {"centre box", "oracle object, 2x box"}


def test_backbones_params_check_variants_and_paper_weights():
    assert load({}, BackbonesParams).variant_list() == ("random", "unimodal", "clip")
    with pytest.raises(ConfigError, match="variants"):
        load({"variants": "random,imagenet"}, BackbonesParams)
    with pytest.raises(ConfigError, match="detr_weights") as error:
        load({"profile": "paper"}, BackbonesParams)
    assert "clip_weights" in str(error.value) and "bert_weights" in str(error.value)
    # Only the weights the chosen variants load are required.
    with pytest.raises(ConfigError) as error:
        load({"profile": "paper", "variants": "clip"}, BackbonesParams)
    assert "clip_weights" in str(error.value) and "bert_weights" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        load({"profile": "paper", "variants": "random"}, BackbonesParams)
    assert "bert_weights" in str(error.value) and "detr_weights" not in str(error.value)
    # Backbones that train cannot be remembered.
    with pytest.raises(ConfigError, match="remember_backbones: true needs freeze_backbones"):
        load({"freeze_backbones": False}, BackbonesParams)
    assert load({"freeze_backbones": False, "remember_backbones": False}, BackbonesParams).remember_backbones is False


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_parameter_file_names_only_its_notebooks_parameters(path):
    notebook = study.find_notebook(path.name.split("-")[0])
    values = study.read_parameter_file(path)
    fields = {field.name for field in dataclasses.fields(notebook.schema)}
    assert set(values) <= fields, f"{path.name}: unknown {sorted(set(values) - fields)}"
    assert values["profile"] == path.stem.split("-")[1]
    if values["profile"] != "paper":  # paper files hold placeholder paths for the user's machine
        load(dict(values), notebook.schema)


def test_train_and_evaluate_trains_and_reports_every_split(tmp_path):
    params = load({"n_train": 8, "n_eval": 4}, DataParams)
    train, evals = grounding_data(params)
    model = build("transvg-tiny", dim=32, depth=1, heads=2, ffn_dim=64, freeze_visual=True, freeze_text=True)
    results = train_and_evaluate(
        model, train, evals, tmp_path / "run", stages=(Stage("train", epochs=1, lr=1e-3),), batch_size=4, seed=0
    )
    assert results["steps"] == 2
    assert set(results["metrics"]) == {"val", "testA", "testB"}
    assert all(metrics["n"] == 4 for metrics in results["metrics"].values())
    assert (tmp_path / "run" / "results.json").is_file()
