"""vgstudy.compare: the methods' plan and recipes, accuracy per split and family, noise, and the efficiency figures.

Timings are never asserted; the tests check that every figure is computed from what it says and is consistent.
"""

from __future__ import annotations

import json
import math
import sys
import types

import matplotlib
import pytest
import torch
from torch import nn

from tests._toy import IMAGE_SIZE, ToyGroundingModel
from vgstudy import compare
from vgstudy.data import SynthRef, TransformConfig
from vgstudy.errors import ConfigError
from vgstudy.evaluate import evaluate_model
from vgstudy.models import describe, hilora
from vgstudy.models.base import Output
from vgstudy.predict import Predictor

matplotlib.use("Agg")


def toy_model() -> ToyGroundingModel:
    """The toy grounding model with the `transform` every vgstudy model carries (SynthRef scenes shrunk to 32 px)."""
    torch.manual_seed(0)
    model = ToyGroundingModel(dropout=0.0)
    model.transform = TransformConfig(image_size=IMAGE_SIZE)
    return model


class LinearBoxes(nn.Module):
    """boxes = sigmoid(W x) on the flattened image: one matmul, so its FLOPs are known exactly."""

    def __init__(self, pixels: int):
        super().__init__()
        self.linear = nn.Linear(pixels, 4, bias=False)
        self.transform = TransformConfig(image_size=IMAGE_SIZE)

    def forward(self, images: torch.Tensor, texts: list[str]) -> Output:
        return Output(boxes=torch.sigmoid(self.linear(images.flatten(1))))


# --- The methods ----------------------------------------------------------------------------------------------------


def test_methods_are_parsed_and_unknown_ones_refused():
    assert compare.parse_methods("hivg, transvg,hivg") == ("hivg", "transvg")
    for bad in ("", "hivg,hvig", "vit"):
        with pytest.raises(ConfigError, match="methods"):
            compare.parse_methods(bad)


def test_plan_runs_the_registered_methods_and_names_the_missing_ones():
    keys = ("transvg", "hivg", "mapper", "epmvg-r")
    present, missing = compare.plan_methods(keys, ["transvg-tiny", "mapper-tiny", "hivg-b"], "tiny")
    assert [m.key for m in present] == ["transvg", "mapper"]
    assert set(missing) == {"hivg", "epmvg-r"} and "'hivg-tiny' is not registered" in missing["hivg"]
    present, missing = compare.plan_methods(keys, ["hivg-b"], "paper")
    assert [m.key for m in present] == ["hivg"] and "transvg-r50" in missing["transvg"]


def test_small_models_are_built_on_copies_of_the_backbones():
    """TransVG freezes its backbones and EpmVG-R its teacher in place: on copies, not on what the next method starts
    from. (HiVG and MaPPER copy what they are given themselves; notebook 05 builds all four.)"""
    from vgstudy.models import build, build_backbone

    backbones = {"clip": build_backbone("clip:tiny"), "vit": build_backbone("dinov2:tiny")}
    before = {name: [p.requires_grad for p in module.parameters()] for name, module in backbones.items()}
    for key in ("transvg", "epmvg-r"):
        model = compare.build_method(compare.METHODS[key], "tiny", backbones=backbones)
        assert 0 < describe(model)["trainable"] < describe(model)["total"], key
        assert isinstance(model.transform, TransformConfig)
        # The model card rebuilds the same architecture, so a trained run's checkpoint loads into it strictly.
        name, overrides = compare.model_card(compare.METHODS[key], "tiny")
        assert json.loads(json.dumps(overrides)) == overrides
        build(name, **overrides).load_state_dict(model.state_dict(), strict=True)
    assert before == {name: [p.requires_grad for p in module.parameters()] for name, module in backbones.items()}
    deployed = compare.deployed_module(compare.METHODS["epmvg-r"], model)
    assert describe(deployed)["total"] < describe(model)["total"]  # the teacher and projections are not deployed
    with pytest.raises(ConfigError, match="backbones"):
        compare.build_method(compare.METHODS["hivg"], "tiny", backbones={"clip": backbones["clip"]})


@pytest.mark.parametrize(
    ("total", "expected"),
    [(4, (1, 1, 1, 1)), (5, (2, 1, 1, 1)), (8, (4, 2, 1, 1)), (12, (6, 2, 2, 2)), (90, (45, 15, 15, 15))],
)
def test_epochs_are_split_as_the_release_splits_them(total, expected):
    assert compare.split_epochs(total, hilora.RELEASE_EPOCHS) == expected
    assert sum(expected) == total


def test_too_few_epochs_for_every_stage_are_refused():
    with pytest.raises(ConfigError, match="3 epochs"):
        compare.split_epochs(3, hilora.RELEASE_EPOCHS)


def test_stages_scale_each_release_recipe_by_one_learning_rate():
    hivg = types.SimpleNamespace(config=types.SimpleNamespace(schedule=hilora.HILORA_SCHEDULE))
    stages = compare.stages_for(compare.METHODS["hivg"], hivg, epochs=8, lr=5e-4, warmup_steps=3)
    assert [s.name for s in stages] == [s.name for s in hilora.HILORA_SCHEDULE]
    assert [s.epochs for s in stages] == [4, 2, 1, 1]
    assert [s.lr for s in stages] == pytest.approx([5 * rate for rate in hilora.RELEASE_LRS])
    assert all(s.warmup_steps == 3 for s in stages)
    # lr = 1e-4 is each release's own recipe.
    assert [s.lr for s in compare.stages_for(compare.METHODS["hivg"], hivg, epochs=4, lr=1e-4)] == pytest.approx(
        hilora.RELEASE_LRS
    )
    (stage,) = compare.stages_for(compare.METHODS["mapper"], None, epochs=3, lr=2e-4)
    assert (stage.epochs, stage.lr, dict(stage.lr_scale)) == (3, 2e-4, {"visual.": 0.1, "text.": 0.1})
    (stage,) = compare.stages_for(compare.METHODS["epmvg-r"], None, epochs=1, lr=1e-4)
    assert dict(stage.lr_scale) == {"student.visual.": 0.1, "student.text.": 0.1}
    assert compare.min_epochs(compare.METHODS["hivg"]) == 4 and compare.min_epochs(compare.METHODS["transvg"]) == 1


def test_paper_cards_name_the_local_weight_files():
    weights = {"detr": "/w/detr.pth", "bert": "/w/bert", "clip": "/w/ViT-B-16.pt", "dinov2": None}
    name, overrides = compare.model_card(compare.METHODS["epmvg-r"], "paper", weights=weights, freeze_backbones=False)
    assert name == "epmvg-r-r50" and overrides["teacher_weights"] == "/w/ViT-B-16.pt"
    assert (overrides["visual_weights"], overrides["text_weights"], overrides["freeze_visual"]) == (
        "/w/detr.pth",
        "/w/bert",
        False,
    )
    name, overrides = compare.model_card(compare.METHODS["mapper"], "paper", weights=weights)
    assert name == "mapper-b" and overrides == {
        "visual_weights": None,
        "text_weights": "/w/bert",
        "prior_weights": "/w/ViT-B-16.pt",
    }


def test_criteria_are_each_methods_own():
    from vgstudy.losses import BoxCriterion
    from vgstudy.losses_hivg import HiVGCriterion

    assert isinstance(compare.criterion_for(compare.METHODS["hivg"], None), HiVGCriterion)
    assert isinstance(compare.criterion_for(compare.METHODS["mapper"], None), BoxCriterion)
    with pytest.raises(ConfigError, match="EpmVGR"):  # EpmVG-R's loss reads its model's teacher
        compare.criterion_for(compare.METHODS["epmvg-r"], toy_model())


def test_training_key_depends_on_values_not_their_order():
    key = compare.training_key({"lr": 5e-4, "epochs": 4})
    assert key == compare.training_key({"epochs": 4, "lr": 5e-4}) and len(key) == 12
    assert key != compare.training_key({"lr": 5e-4, "epochs": 5})


def test_reported_numbers_come_from_the_papers_files():
    hivg = compare.reported_accuracy(compare.METHODS["hivg"])
    assert list(hivg) == ["val", "testA", "testB"] and hivg["val"].value == 87.32 and hivg["val"].source == "Table 1"
    assert compare.reported_accuracy(compare.METHODS["transvg"])["testB"].model == "TransVG-R50"
    assert compare.reported_accuracy(compare.METHODS["epmvg-r"]) == {}  # no public number
    assert compare.reported_accuracy(compare.METHODS["mapper"], "referit") == {}
    mapper = {r.metric: r.value for r in compare.reported_efficiency(compare.METHODS["mapper"])}
    assert mapper["params_trainable"] == 2774043 and mapper["params_trainable_pct"] == 1.41
    printed = [compare.format_reported(r) for r in compare.reported_efficiency(compare.METHODS["mapper"])]
    assert printed == ["196,061,952", "2,774,043", "1.41"]
    assert compare.reported_efficiency(compare.METHODS["epmvg-r"]) == []


# --- Accuracy and noise ---------------------------------------------------------------------------------------------


def test_evaluate_scores_every_split_and_pools_the_families():
    model = toy_model()
    evals = {split: SynthRef(split, 12, seed=3, image_size=IMAGE_SIZE) for split in ("val", "testA", "testB")}
    scores = compare.evaluate(model, evals, batch_size=5)
    from vgstudy.data import GroundingTransform, TransformedDataset, collate

    for split, data in evals.items():  # the same numbers as the Trainer's evaluation
        expected = evaluate_model(
            model, TransformedDataset(data, GroundingTransform(model.transform)), collate_fn=collate
        )
        assert scores["splits"][split] == pytest.approx(expected)
    families = scores["families"]
    assert sum(f["n"] for f in families.values()) == 36
    attribute = sum(evals["val"][i].family == "attribute" for i in range(12)) + 12  # testA is all attribute
    assert families["attribute"]["n"] == attribute
    assert set(families) <= {"attribute", "relation", "position", "comparative"} and "relation" in families


def test_one_seed_estimate_is_the_binomial_margin():
    one = compare.estimate([30.0], 100)
    assert one.margin == pytest.approx(200 * math.sqrt(0.3 * 0.7 / 100))
    assert str(one) == "30.0"
    assert compare.estimate([0.0], 50).margin > 0  # a 0% on 50 samples is not exact


def test_seed_spread_adds_to_the_evaluation_noise():
    spread = compare.estimate([20.0, 30.0, 40.0], 100)
    assert (spread.mean, spread.std, spread.seeds) == (30.0, 10.0, 3)
    binomial = 100 * math.sqrt(0.3 * 0.7 / 100)
    assert spread.standard_error == pytest.approx(math.sqrt(binomial**2 + 100 / 3))
    assert str(spread) == "30.0 ± 10.0"
    with pytest.raises(ConfigError):
        compare.estimate([], 10)
    with pytest.raises(ConfigError):
        compare.estimate([float("nan")], 10)


def test_ranking_calls_a_lead_decisive_only_beyond_the_noise():
    close = {"A": compare.estimate([31.0], 100), "B": compare.estimate([30.0], 100), "C": compare.estimate([5.0], 100)}
    rank = compare.ranking(close)
    assert (rank["best"], rank["tied"], rank["runner_up"], rank["decisive"]) == ("A", ["A"], "B", False)
    assert rank["gap"] == pytest.approx(1.0)
    assert rank["margin"] == pytest.approx(2 * math.hypot(close["A"].standard_error, close["B"].standard_error))
    far = compare.ranking({"A": compare.estimate([90.0], 1000), "B": compare.estimate([30.0], 1000)})
    assert far["decisive"] and far["gap"] == pytest.approx(60.0)
    tie = compare.ranking({"B": compare.estimate([0.0], 50), "A": compare.estimate([0.0], 50)})
    assert tie["tied"] == ["A", "B"] and tie["gap"] == 0 and not tie["decisive"]
    alone = compare.ranking({"A": compare.estimate([10.0], 10)})
    assert alone["runner_up"] is None and not alone["decisive"] and math.isnan(alone["gap"])
    with pytest.raises(ConfigError):
        compare.ranking({})


# --- Efficiency -----------------------------------------------------------------------------------------------------


def test_forward_flops_count_the_matmul_exactly():
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    model = LinearBoxes(pixels)
    batch = {"images": torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE), "texts": ["a"] * 5}
    assert compare.forward_flops(model, batch) == 2 * pixels * 4
    assert model.training  # its mode is given back


def test_measure_efficiency_reports_every_figure_consistently():
    model = toy_model()
    samples = SynthRef("val", 6, seed=0, image_size=IMAGE_SIZE)
    batch = compare.measurement_batch(model, samples, 4, "cpu")
    assert batch["images"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and len(batch["families"]) == 4
    method = compare.METHODS["transvg"]
    result = compare.measure_efficiency(method, model, batch, steps=2)
    counts = describe(model)
    assert result["parameters"] == {
        "total": counts["total"],
        "trainable": counts["trainable"],
        "inference": counts["total"],
    }
    assert 0 < result["gflops"]["inference"] < result["gflops"]["training"]  # the backward adds the gradients'
    assert result["train_samples_per_s"] == pytest.approx(4 / result["train_step_s"])
    assert result["infer_samples_per_s"] == pytest.approx(4 / result["infer_step_s"])
    assert result["memory_mb"] >= compare.parameter_bytes(model) / compare.MB
    assert result["energy_joules_per_sample"] is None and result["energy_note"] == "n/a on CPU"
    assert "with the trained model in memory" in result["memory_method"]
    with pytest.raises(ConfigError, match="measurement batch of 7"):
        compare.measurement_batch(model, samples, 7, "cpu")


def test_parameter_bytes_count_shared_tensors_once():
    linear = nn.Linear(10, 10)
    tied = nn.Sequential(linear, linear)
    assert compare.parameter_bytes(tied) == compare.parameter_bytes(linear) == (100 + 10) * 4


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_sees_a_large_allocation_above_its_baseline():
    memory = compare.PeakMemory(torch.device("cpu"), baseline="before the test")
    assert memory.method.endswith("the RSS before the test")
    memory.set_baseline()
    memory.reset()
    block = torch.ones(32 * compare.MB // 4)  # 32 MiB, written so that it is resident
    peak = memory.peak_mb()
    del block
    assert peak >= 30


def test_energy_per_sample_reads_the_nvml_counter(monkeypatch):
    calls = {"n": 0}

    def energy(handle):
        calls["n"] += 1
        return 1000.0 * calls["n"]  # 1 J more at each read

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetTotalEnergyConsumption=energy,
    )
    meter = compare.EnergyMeter(torch.device("cuda", 1), nvml=fake)
    assert meter.handle == "gpu1"
    steps = []
    result = compare.energy_per_sample(lambda: steps.append(1), 4, meter, min_seconds=0.0)
    assert result["steps"] == len(steps) == 1
    assert result["joules_per_sample"] == pytest.approx(1.0 / 4)  # 1 J over 1 step of 4 samples

    assert compare.EnergyMeter.unavailable(torch.device("cpu")) == "n/a on CPU"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # an import of pynvml now fails
    assert "not installed" in compare.EnergyMeter.unavailable(torch.device("cuda"))


# --- One scene, every method's box ------------------------------------------------------------------------------------


def test_every_methods_box_on_one_scene():
    import matplotlib.pyplot as plt

    sample = SynthRef("val", 1, seed=0, image_size=48)[0]
    predictors = {"toy": Predictor(toy_model()), "other toy": Predictor(toy_model())}
    boxes = compare.predict_all(predictors, sample.image, sample.text)
    assert set(boxes) == {"toy", "other toy"} and boxes["toy"] == pytest.approx(boxes["other toy"])
    assert all(0 <= v <= 48 for box in boxes.values() for v in box)
    fig, ax = plt.subplots()
    compare.show_predictions(ax, sample.image, sample.text, boxes, gt_xyxy=sample.box_xyxy.tolist())
    assert len(ax.patches) == 3  # the ground truth and one box per method
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ground truth", "toy", "other toy"]
    plt.close(fig)


def test_pooled_accuracy_weights_each_split_by_its_samples():
    metrics = {"val": {"acc50": 50.0, "n": 100}, "testA": {"acc50": 20.0, "n": 300}, "testB": {"acc50": 0.0, "n": 5}}
    assert compare.pooled_accuracy(metrics, ("val", "testA")) == (pytest.approx(27.5), 400)
    assert compare.pooled_accuracy(metrics) == (pytest.approx(11000 / 405), 405)
    with pytest.raises(ConfigError, match="no evaluated sample"):
        compare.pooled_accuracy({"val": {"acc50": 0.0, "n": 0}})
