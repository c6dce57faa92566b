"""Notebook 04's library: the EpmVG-R grid as data, the noise margins of its verdicts, the modality-gap measures, the
cost of a distillation step, the reader of the other notebooks' results, and the notebook's parameter schema."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vgstudy.config import EpmVGParams, load
from vgstudy.data.synthref import SynthRef
from vgstudy.data.transforms import GroundingTransform, TransformedDataset, collate
from vgstudy.epmvg_study import (
    GRID,
    Difference,
    difference,
    grid_names,
    grid_runs,
    grid_table,
    modality_gap,
    other_method_results,
    pair_embeddings,
    similarities,
    standard_error,
    step_times,
    training_flops,
)
from vgstudy.errors import ConfigError
from vgstudy.losses import BoxCriterion
from vgstudy.losses_epmvg import DISTILLATION_TERMS, EpmVGRCriterion
from vgstudy.models import build_backbone
from vgstudy.models.epmvg import EpmVGR
from vgstudy.models.transvg import TransVG
from vgstudy.train import Stage, TrainConfig, Trainer

# A small student and the clip:tiny teacher at 64 px, as in tests/test_epmvg.py.
STUDENT = dict(
    visual="resnet18+detr:tiny",
    text="clip:tiny",
    dim=32,
    depth=1,
    heads=2,
    ffn_dim=64,
    dropout=0.0,
    visual_options={"return_layer": "layer3", "depth": 1},
)


@pytest.fixture(scope="module")
def parts() -> tuple[TransVG, torch.nn.Module]:
    torch.manual_seed(0)
    return TransVG(**STUDENT), build_backbone("clip:tiny", image_size=64)


def make_model(parts) -> EpmVGR:
    return EpmVGR(copy.deepcopy(parts[0]), copy.deepcopy(parts[1]))


@pytest.fixture(scope="module")
def data(parts) -> TransformedDataset:
    return TransformedDataset(SynthRef("val", 6, seed=1), GroundingTransform(parts[0].transform))


@pytest.fixture(scope="module")
def batch(data) -> dict:
    return collate([data[i] for i in range(4)])


# --- The grid -------------------------------------------------------------------------------------------------------


def test_the_grid_holds_a0_to_a9_with_the_controls_it_promises():
    assert list(GRID) == [f"A{i}" for i in range(10)]
    assert not GRID["A0"].weights and GRID["A0"].terms() == "none"
    assert all(set(row.weights) <= set(DISTILLATION_TERMS) for row in GRID.values())
    singles = {GRID[f"A{i}"].terms() for i in (1, 2, 3, 4)}
    assert singles == {"D1", "D2", "D3", "D4"}  # each term alone once
    assert GRID["A3"].weights == {"contrastive": 1.0} and not GRID["A3"].reads_teacher  # the teacher-free control
    assert [row.name for row in GRID.values() if not row.reads_teacher] == ["A0", "A3"]
    assert GRID["A7"].terms() == "D1+D2+D4" and GRID["A7"].teacher == "multimodal"
    # the control differs from A7 in the teacher only; A9 sweeps A7's weights
    assert GRID["A8"].weights == GRID["A7"].weights and GRID["A8"].teacher == "unimodal"
    assert GRID["A9"].weights == GRID["A7"].weights and GRID["A9"].sweep
    assert [row for row in GRID.values() if row.sweep] == [GRID["A9"]]


def test_grid_runs_keep_the_grid_order_and_expand_the_sweep_with_scaled_weights():
    runs = grid_runs("A9, A0,A8", (0.25, 4))
    assert [run.key for run in runs] == ["A0", "A8", "A9x0.25", "A9x4"]
    assert not runs[0].distils and runs[0].weights == dict.fromkeys(DISTILLATION_TERMS, 0.0)
    assert runs[3].weights == {"feature": 4.0, "relation": 4.0, "contrastive": 0.0, "region": 4.0}
    assert runs[1].weights == {"feature": 1.0, "relation": 1.0, "contrastive": 0.0, "region": 1.0}
    assert [row[0] for row in grid_table()] == list(GRID)
    assert [row[2] for row in grid_table()].count("–") == 2  # A0 and A3 read no teacher
    assert [row[4] for row in grid_table(["A0"])] == ["yes"] + [""] * 9


@pytest.mark.parametrize(
    ("names", "scales", "match"),
    [
        ("A0,B1", (), "unknown \\['B1'\\]"),
        ("A0,A0", (), "repeated"),
        (" , ", (), "no name"),
        ("A9", (), "A9 sweeps the weights"),
        ("A9", (0.5, -1.0), "A9 sweeps the weights"),
        ("A9", (float("nan"),), "A9 sweeps the weights"),
        ("A9", (2.0, 2.0), "distinct scales"),
    ],
)
def test_bad_grids_are_config_errors(names, scales, match):
    with pytest.raises(ConfigError, match=match):
        grid_runs(names, scales)


def test_grid_names_lists_the_known_rows_in_its_error():
    with pytest.raises(ConfigError, match="A0, A1, A2"):
        grid_names("A10")


# --- Accuracy and noise ---------------------------------------------------------------------------------------------


def test_the_margin_is_binomial_for_one_seed_and_grows_with_the_seeds_spread():
    # one seed at 50% on 100 samples: one standard error is 5 points
    assert standard_error([50.0], 100) == pytest.approx(5.0)
    # three agreeing seeds on the same 100 samples: still those samples' binomial error
    assert standard_error([50.0, 50.0, 50.0], 100) == pytest.approx(5.0)
    # seeds that disagree: their spread (std / sqrt(seeds)) joins the binomial error
    assert standard_error([20.0, 50.0, 80.0], 100) == pytest.approx(math.sqrt(5.0**2 + 30.0**2 / 3))
    d = difference([60.0], [50.0], 100)
    assert d.delta == pytest.approx(10.0)
    assert d.margin == pytest.approx(2 * math.hypot(standard_error([60.0], 100), 5.0))
    assert d.outcome == "same"  # 10 points on 100 samples per side is within two standard errors
    assert difference([70.0], [50.0], 100).outcome == "better"
    assert difference([30.0], [50.0], 100).outcome == "worse"
    # accuracies of 0 still have a margin (a floor on p, not a zero standard error)
    assert difference([0.0], [0.0], 100).margin > 0
    with pytest.raises(ConfigError, match="difference"):
        difference([], [1.0], 10)


def test_a_difference_of_estimates_uses_both_errors():
    d = Difference.of_estimates(0.7, 0.03, 0.5, 0.04)
    assert (d.delta, d.margin) == (pytest.approx(0.2), pytest.approx(0.1))
    assert d.outcome == "better" and d.text("", 3) == "+0.200 ± 0.100 (better)"
    assert str(Difference(-1.0, 2.5)) == "-1.0 ± 2.5 pp (same)"


# --- The modality gap -----------------------------------------------------------------------------------------------


def test_aligned_pairs_retrieve_each_other_and_shuffled_ones_do_not():
    n = 12
    image = torch.eye(n, 16)
    aligned = modality_gap(image, image.clone())
    assert aligned["image_to_text_top1"] == aligned["text_to_image_top1"] == 100.0
    assert aligned["matched_auc"] == 1.0 and aligned["matched_cosine"] == pytest.approx(1.0)
    assert aligned["centroid_distance"] == pytest.approx(0.0, abs=1e-6)
    assert aligned["chance_top1"] == pytest.approx(100 / n)
    shuffled = modality_gap(image, image.roll(1, 0))  # every text belongs to the next image
    assert shuffled["image_to_text_top1"] == 0.0
    # each image's own text (cosine 0) loses to one other text and ties with the other 10 (a half each)
    assert shuffled["matched_auc"] == pytest.approx(5 / 11)


def test_a_constant_offset_between_modalities_is_a_centroid_gap_not_a_retrieval_failure():
    torch.manual_seed(0)
    shared = F.normalize(torch.randn(20, 32), dim=-1)
    offset = torch.zeros(32)
    offset[0] = 3.0
    gap = modality_gap(shared + offset, shared - offset)
    assert gap["centroid_distance"] > 1.0  # the cones sit apart (Liang et al.'s modality gap)...
    assert gap["image_to_text_top1"] == 100.0  # ...while each pair stays its own best match
    assert gap["unmatched_cosine"] < gap["matched_cosine"]


def test_repeated_expressions_count_as_hits_and_are_not_unmatched_pairs():
    image = torch.eye(4, 8)
    text = image.clone()
    text[1] = image[0]  # pair 1's text embedding is pair 0's: the same expression twice
    keys = ["red", "red", "blue", "green"]
    gap = modality_gap(image, text, keys)
    assert gap["image_to_text_top1"] == 100.0  # image 1 retrieves text 0, which says the same
    assert gap["chance_top1"] == pytest.approx(100 * (2 + 2 + 1 + 1) / 16)
    matched, unmatched = similarities(image, text, keys)
    assert matched.shape == (4,) and unmatched.shape == (16 - 6,)  # the 6 same-expression cells left out
    without_keys = modality_gap(image, text)
    assert without_keys["text_to_image_top1"] < 100.0  # text 1 now has a "wrong" best image


def test_bad_embeddings_are_config_errors():
    with pytest.raises(ConfigError, match="one shape"):
        modality_gap(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ConfigError, match="N >= 2"):
        modality_gap(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ConfigError, match="3 keys for 4 pairs"):
        modality_gap(torch.randn(4, 8), torch.randn(4, 8), ["a", "b", "c"])


def test_pair_embeddings_give_each_space_for_every_pair_and_restore_the_mode(parts, data):
    model = make_model(parts).train()
    embedded = pair_embeddings(model, data, batch_size=4)
    assert model.training and set(embedded) == {"student", "projected", "teacher"}
    assert embedded["student"][0].shape == (6, 32) and embedded["projected"][1].shape == (6, 128)
    for image, text in embedded.values():
        assert len(image) == len(text) == 6
        torch.testing.assert_close(image.norm(dim=-1), torch.ones(6))
    # the projected space is what the model gives the criterion in train mode (without dropout: eval mode here)
    everything = collate([data[i] for i in range(6)])
    model.eval()
    with torch.no_grad():
        aux = model.student(everything["images"], everything["texts"], everything["valid"]).aux
        expected = model.embed(aux)
        teacher = EpmVGRCriterion(model).teacher_embeddings(everything, ("image", "text"))
    torch.testing.assert_close(embedded["projected"][0], expected["image"])
    torch.testing.assert_close(embedded["teacher"][1], teacher["text"])
    torch.testing.assert_close(embedded["teacher"][0], teacher["image"])
    assert "teacher" not in pair_embeddings(model, data, teacher=False)


def test_train_mode_embeddings_are_embed_of_the_student_aux(parts, batch):
    model = make_model(parts).train()
    torch.manual_seed(3)
    out = model(batch["images"], batch["texts"])
    embedded = model.embed(out.aux)
    for name in ("image", "text", "region"):
        torch.testing.assert_close(out.aux[f"{name}_embedding"], embedded[name])


# --- Cost -----------------------------------------------------------------------------------------------------------


def test_step_timing_and_flops_leave_the_model_alone_and_count_the_teacher(parts, batch):
    model = make_model(parts)
    before = copy.deepcopy(model.state_dict())
    full = dict(feature=1.0, relation=1.0, contrastive=0.0, region=1.0)
    none = dict.fromkeys(DISTILLATION_TERMS, 0.0)
    times = step_times({"none": (model, none), "full": (model, full)}, batch, steps=2)
    assert list(times) == ["none", "full"]
    assert all(len(t[kind]) == 2 and min(t[kind]) > 0 for t in times.values() for kind in ("wall_s", "cpu_s"))
    flops_none, flops_full = training_flops(model, none, batch), training_flops(model, full, batch)
    assert 0 < flops_none < flops_full
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    assert int(model.distillation_calls) == 0
    with pytest.raises(ConfigError, match="steps"):
        step_times({"full": (model, full)}, batch, steps=0)


def test_a0_trains_exactly_as_plain_transvg(parts, tmp_path):
    """The grid's A0 (every weight 0) is TransVG: the same student weights after the same steps."""
    train = TransformedDataset(SynthRef("train", 8, seed=0), GroundingTransform(parts[0].transform))
    config = TrainConfig(stages=(Stage("train", epochs=1, lr=1e-3),), batch_size=4, eval_every_epochs=0, amp="off")
    epmvg, plain = make_model(parts), copy.deepcopy(parts[0])
    a0 = grid_runs("A0")[0]
    Trainer(epmvg, EpmVGRCriterion(epmvg, **a0.weights), train, config, tmp_path / "a0", collate_fn=collate).fit()
    Trainer(plain, BoxCriterion(), train, config, tmp_path / "plain", collate_fn=collate).fit()
    trained = epmvg.student.state_dict()
    assert any(not torch.equal(value, parts[0].state_dict()[key]) for key, value in trained.items())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0)


# --- The other notebooks' results -----------------------------------------------------------------------------------


def write_run(root, notebook, run, results, mtime):
    path = root / notebook / run / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))
    os.utime(path, (mtime, mtime))
    return path


def metrics(acc):
    return {split: {"acc50": acc + i, "n": 10} for i, split in enumerate(("val", "testA", "testB"))}


def test_other_results_come_from_the_newest_matching_run_with_seeds_grouped(tmp_path):
    splits = ("val", "testA", "testB")
    assert other_method_results(tmp_path, "02_hivg", profile="tiny", dataset="synthref", splits=splits) is None
    params = {"profile": "tiny", "dataset": "synthref"}
    write_run(tmp_path, "02_hivg", "old", {"params": params, "runs": {"hivg": [{"metrics": metrics(1)}]}}, 1000)
    study = {"params": {**params, "profile": "study"}, "runs": {"hivg": [{"metrics": metrics(9)}]}}
    write_run(tmp_path, "02_hivg", "study", study, 3000)
    newest = {
        "params": {**params, "n_train": 320},
        "runs": {"hivg": [{"seed": 0, "metrics": metrics(10)}, {"seed": 1, "metrics": metrics(20)}]},
        "results": {"transvg": {"metrics": metrics(5)}},
        "baselines": {"largest object": {"metrics": metrics(50)}},  # not a model
    }
    path = write_run(tmp_path, "02_hivg", "new", newest, 2000)
    write_run(tmp_path, "02_hivg", "odd", ["a list, not a results dict"], 4000)
    (tmp_path / "02_hivg" / "broken").mkdir()
    (tmp_path / "02_hivg" / "broken" / "results.json").write_text("{not json")
    found = other_method_results(tmp_path, "02_hivg", profile="tiny", dataset="synthref", splits=splits)
    assert found.path == path and found.params["n_train"] == 320
    assert found.rows == {
        "hivg": [{"val": 10.0, "testA": 11.0, "testB": 12.0}, {"val": 20.0, "testA": 21.0, "testB": 22.0}],
        "transvg": [{"val": 5.0, "testA": 6.0, "testB": 7.0}],
    }
    # no model evaluated on every asked split: no run to show
    assert other_method_results(tmp_path, "02_hivg", profile="tiny", dataset="synthref", splits=("testC",)) is None


# --- The notebook's parameters --------------------------------------------------------------------------------------


def test_epmvg_params_check_the_grid_the_sweep_and_the_paper_weights():
    params = load({}, EpmVGParams)
    assert [run.key for run in grid_runs(params.grid, params.weight_scales)] == ["A0", "A7", "A8"]
    assert load({"n_seeds": 3, "seed": 5}, EpmVGParams).seeds() == (5, 6, 7)
    assert load({"weight_scales": "0.5, 2"}, EpmVGParams).weight_scales == (0.5, 2.0)  # papermill's strings
    with pytest.raises(ConfigError, match="grid / weight_scales.*unknown \\['A11'\\]"):
        load({"grid": "A0,A11"}, EpmVGParams)
    with pytest.raises(ConfigError, match="A9 sweeps"):
        load({"grid": "A9", "weight_scales": [0.0]}, EpmVGParams)
    with pytest.raises(ConfigError, match="teacher"):
        load({"teacher": "dinov2:tiny"}, EpmVGParams)
    with pytest.raises(ConfigError, match="detr_weights") as error:
        load({"profile": "paper"}, EpmVGParams)
    assert "clip_weights" in str(error.value) and "bert_weights" in str(error.value)
