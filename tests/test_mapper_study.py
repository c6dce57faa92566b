"""Notebook 03's measuring code (vgstudy.mapper_study) and its parameters (MaPPERParams).

What `tests/models/test_mapper.py` and `test_petl.py` already cover (the 2,774,043 / 196.06 M count and its
per-module breakdown, each release deviation on its own, the PETL counts) is not repeated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vgstudy import study
from vgstudy.config import MaPPERParams, load
from vgstudy.errors import ConfigError
from vgstudy.mapper_study import (
    COMPONENTS,
    FIGURE1,
    VARIANTS,
    TrainingMemory,
    accuracy_margin,
    binomial_se,
    build_variant,
    cells_inside,
    compare,
    compare_to_level,
    dypa_token_scales,
    model_card,
    parse_variants,
    prior_end_features,
    prior_pointing,
    seed_summary,
    state_bytes,
    summaries,
    token_influence,
    training_memory,
)
from vgstudy.models import build
from vgstudy.models.backbones import build_backbone
from vgstudy.models.mapper import DynamicPriorAdapter, LocalConvAdapter, ReleaseDeviations
from vgstudy.models.petl import BottleneckAdapter

PARAMS_DIR = Path(__file__).resolve().parents[1] / "notebooks" / "params"
TEXTS = ["the red circle left of the blue star", "the second triangle from the top"]


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {"visual_module": build_backbone("dinov2:tiny"), "prior_module": build_backbone("clip:tiny", max_len=20)}


@pytest.fixture(scope="module")
def grid(backbones):
    """Every variant at tiny size, same seed."""
    built = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        built[name] = build_variant(name, "tiny", **backbones).eval()
    return built


# --- The grid -------------------------------------------------------------------------------------------------------


def test_each_variant_has_exactly_its_modules(grid):
    def has(model, kind):
        return any(isinstance(m, kind) for m in model.modules())

    expected = {  # (LoCA, DyPA, PGT, prior)
        "frozen": (False, False, False, False),
        "dypa": (False, True, False, True),
        "loca": (True, False, False, False),
        "pgt": (False, False, True, True),
        "mapper": (True, True, True, True),
        "no-prior": (True, True, False, False),
        "release": (True, True, True, True),
    }
    for name, (loca, dypa, pgt, prior) in expected.items():
        model = grid[name]
        found = (has(model, LocalConvAdapter), has(model, DynamicPriorAdapter), model.pgt is not None)
        assert found == (loca, dypa, pgt), name
        assert (model.prior is not None) == prior == VARIANTS[name].uses_prior, name
    assert grid["no-prior"].text.blocks[1].adapter.scale is None  # DyPA's scale is 1 without the prior
    assert grid["release"].deviations == ReleaseDeviations.of("release")
    assert grid["mapper"].deviations == ReleaseDeviations.of("paper")
    for name in ("full", "adapter", "lora", "adaptformer"):
        assert grid[name].prior is None and not has(grid[name], (LocalConvAdapter, DynamicPriorAdapter)), name
        assert grid[name].petl.method == name


def test_tunable_counts_of_the_grid(grid):
    counts = {name: model.tunable_count().tunable for name, model in grid.items()}
    assert counts["frozen"] == 0
    assert counts["full"] == grid["full"].backbone_parameters
    assert counts["mapper"] == counts["dypa"] + counts["loca"] + counts["pgt"] == 338_505
    assert counts["release"] == counts["mapper"] + 3 * (128 * 16 + 16)  # the unused prior projections
    assert counts["adapter"] < counts["mapper"] < counts["full"]
    assert FIGURE1[-1] == "mapper" and COMPONENTS[0] == "frozen"
    assert [VARIANTS[n].figure1 for n in FIGURE1] == ["full fine-tuning", "Adapter", "LoRA", "AdaptFormer", "MaPPER"]


def test_build_variant_drops_prior_options_for_petl_and_keeps_them_for_mapper(backbones):
    torch.manual_seed(0)
    petl = build_variant("lora", "tiny", prior_seed=3, **backbones)  # prior_* would be a ConfigError for PETL
    assert petl.prior is None
    torch.manual_seed(0)
    release = build_variant("release", "tiny", prior_seed=3, **backbones)
    torch.manual_seed(0)
    other = build_variant("release", "tiny", prior_seed=4, **backbones)
    key = "prior.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(release.state_dict()[key], other.state_dict()[key])
    with pytest.raises(ConfigError, match="unknown variant 'mapper-b'"):
        build_variant("mapper-b", "tiny")
    with pytest.raises(ConfigError, match="size 'base'"):
        build_variant("mapper", "base")


@pytest.mark.parametrize("name", ["release", "lora"])
def test_the_model_card_rebuilds_the_architecture(backbones, grid, name):
    card_name, overrides = model_card(name, "tiny", max_len=20, prior_seed=2, text_weights=Path("x"), **backbones)
    assert card_name == f"{VARIANTS[name].family}-tiny"
    json.dumps(overrides)  # JSON-able: no modules, no paths
    assert ("prior_seed" in overrides) == (name == "release")
    rebuilt = build(card_name, **overrides)
    assert rebuilt.state_dict().keys() == grid[name].state_dict().keys()
    assert all(v.shape == grid[name].state_dict()[k].shape for k, v in rebuilt.state_dict().items())


def test_parse_variants():
    assert parse_variants("all") == tuple(VARIANTS)
    assert parse_variants(" mapper , lora,") == ("mapper", "lora")
    with pytest.raises(ConfigError, match=r"unknown \['dypaa'\]"):
        parse_variants("mapper,dypaa")
    with pytest.raises(ConfigError, match="empty list"):
        parse_variants(" , ")
    with pytest.raises(ConfigError, match="named twice"):
        parse_variants("mapper,mapper")


# --- Memory ---------------------------------------------------------------------------------------------------------


def _mlp(freeze_first: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(not freeze_first)
    return model


def test_training_memory_counts_what_autograd_saves_once_per_pass():
    x = torch.randn(16, 4)
    model = _mlp(freeze_first=False)
    with TrainingMemory(model) as meter:
        for _ in range(3):  # three passes: the peak is one pass, not their sum
            model(x).sum().backward()
    # Linear 1 keeps its input (16 x 4) for its weight's gradient; ReLU keeps its output (16 x 8), which Linear 2
    # also keeps as its input (one storage, counted once); the weights are parameters, not counted.
    assert meter.passes == 3
    assert meter.peak_saved_bytes == 4 * (16 * 4 + 16 * 8)
    frozen = _mlp(freeze_first=True)
    with TrainingMemory(frozen) as meter_frozen:
        frozen(x).sum().backward()
    assert meter_frozen.peak_saved_bytes == 4 * 16 * 8  # nothing below the first trainable layer is kept
    with TrainingMemory(model) as meter_eval, torch.no_grad():
        model(x)
    assert meter_eval.peak_saved_bytes == 0
    x.requires_grad_(True)
    model(x).sum().backward()  # the hooks are gone once the block is left: nothing is counted any more
    assert meter.peak_saved_bytes == 4 * (16 * 4 + 16 * 8)
    with TrainingMemory(model) as meter_moved:
        model.double()  # new parameter storages inside the block (as when the Trainer moves the model to a GPU)
        model(x.double()).sum().backward()
    assert meter_moved.peak_saved_bytes == 8 * (16 * 4 + 16 * 8)  # still without the weights


def test_state_bytes_and_training_memory_in_mib():
    model = _mlp(freeze_first=True)
    weights = 4 * (4 * 8 + 8 + 8 * 2 + 2)
    trainable = 4 * (8 * 2 + 2)
    assert state_bytes(model) == {"weights": weights, "optimiser": 3 * trainable}
    with TrainingMemory(model) as meter:
        model(torch.randn(16, 4)).sum().backward()
    memory = training_memory(model, meter)
    assert memory["activations"] == pytest.approx(4 * 16 * 8 / 2**20)
    assert memory["total"] == pytest.approx((weights + 3 * trainable + 4 * 16 * 8) / 2**20)
    assert "cuda_peak" not in memory


# --- The components at work -----------------------------------------------------------------------------------------


def test_token_influence_is_a_3x3_neighbourhood_for_loca_and_one_cell_for_a_bottleneck():
    torch.manual_seed(0)
    loca = LocalConvAdapter(16, 12, 8, 2, 4, grid_hw=(6, 6), num_prefix_tokens=1)
    bottleneck = BottleneckAdapter(16, 4)
    torch.nn.init.normal_(bottleneck.up.weight)
    loca.train()
    moved = token_influence(loca, (6, 6), 16, cell=(2, 3)) > 0
    assert loca.training  # put back as it was
    assert moved[1:4, 2:5].all() and moved.sum() == 9
    corner = token_influence(loca, (6, 6), 16, cell=(0, 0)) > 0
    assert corner[:2, :2].all() and corner.sum() == 4
    single = token_influence(bottleneck, (6, 6), 16, cell=(2, 3)) > 0
    assert single[2, 3] and single.sum() == 1


def test_dypa_token_scales_are_the_adapters_own(grid):
    model = grid["mapper"]
    items = dypa_token_scales(model, TEXTS)
    batch = model.text.tokenize(TEXTS)
    prior = model.prior_features(TEXTS, batch)
    layer = model.text.blocks[3].adapter
    expected = torch.relu(layer.scale(layer.prior_norm(prior)))[1, :, 0][batch.mask[1]]
    assert items[1].scales["layer 3"] == pytest.approx(expected.tolist())
    assert set(items[0].scales) == {"layer 1", "layer 3", "layer 5"}
    first = items[0]
    assert first.bert_tokens[0] == "<start>" and first.bert_tokens[-1] == "<end>"
    assert first.bert_tokens[1:4] == ("the", "red", "circle") == first.prior_tokens[1:4]
    assert len(first.scales["layer 1"]) == len(first.bert_tokens) == int(batch.mask[0].sum())
    with pytest.raises(ConfigError, match="no DyPA with a prior"):
        dypa_token_scales(grid["loca"], TEXTS)


def test_cells_inside_marks_the_cells_whose_centre_is_in_the_box():
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [70.0, 10.0, 90.0, 30.0]])  # pixels of a 128 x 128 input
    inside = cells_inside(boxes, (4, 4), 128).reshape(2, 4, 4)  # cells of 32 px, centres at 16, 48, 80, 112
    assert inside[0, :2, :2].all() and inside[0].sum() == 4
    assert inside[1, 0, 2] and inside[1].sum() == 1


@pytest.mark.parametrize("name", ["mapper", "release"])
def test_prior_pointing_reads_the_prior_at_the_end_token(grid, name):
    model = grid[name]
    texts = [*TEXTS, "the big green cross", "a small ring"]
    batch = model.text.tokenize(texts)
    prior = model.prior_features(texts, batch)
    mask = batch.mask if name == "release" else model.prior.tokenize(texts).mask  # the release: BERT's ids
    ends = prior[torch.arange(4), mask.sum(1) - 1]  # (4, P)
    torch.testing.assert_close(prior_end_features(model, texts), ends)
    noise = torch.randn(4, 6, ends.shape[1], generator=torch.Generator().manual_seed(0)) * 1e-3
    patches = noise.clone()
    patches[torch.arange(4), torch.tensor([0, 2, 5, 1])] += ends  # each text's own patch
    inside = torch.zeros(4, 6, dtype=torch.bool)
    inside[torch.arange(4), torch.tensor([0, 2, 5, 1])] = True
    assert prior_pointing(model, patches, texts, inside) == {"accuracy": 100.0, "chance": pytest.approx(100 / 6)}
    inside[:2] = ~inside[:2]  # the first two now point off their object
    assert prior_pointing(model, patches, texts, inside)["accuracy"] == 50.0
    with pytest.raises(ConfigError, match="no prior"):
        prior_end_features(grid["loca"], texts)


# --- Seeds, noise, verdicts -----------------------------------------------------------------------------------------


def test_summaries_margins_and_verdicts():
    one = seed_summary([50.0], n=100)
    assert (one.mean, one.std, one.seeds, one.n) == (50.0, 0.0, 1, 100) and str(one) == "50.0"
    three = seed_summary([40.0, 50.0, 60.0], n=100)
    assert three.std == pytest.approx(10.0) and str(three) == "50.0 ± 10.0"
    assert binomial_se(50.0, 100) == pytest.approx(5.0)
    assert binomial_se(0.0, 100) == binomial_se(1.0, 100) > 0  # kept off 0
    assert accuracy_margin(one, one) == pytest.approx(2 * (25 + 25) ** 0.5)
    assert accuracy_margin(three, one) == pytest.approx(2 * (25 + 100 / 3 + 25) ** 0.5)
    assert compare(seed_summary([70.0], 100), one) == "holds"
    assert compare(one, seed_summary([70.0], 100)) == "contradicted"
    assert compare(seed_summary([60.0], 100), one) == "within noise"
    assert compare(seed_summary([60.0] * 3, 100), one) == "within noise"
    with pytest.raises(ConfigError, match="no value"):
        seed_summary([], n=10)
    assert compare_to_level(seed_summary([10.0], 128), 4.0) == "holds"  # only the measured side is noisy
    assert compare(seed_summary([10.0], 128), seed_summary([4.0], 128)) == "within noise"
    assert compare_to_level(seed_summary([2.0], 128), 4.0) == "within noise"
    assert compare_to_level(seed_summary([2.0], 1000), 10.0) == "contradicted"


def test_summaries_of_trainer_results():
    def result(acc):
        return {"metrics": {"val": {"acc50": acc, "n": 50}, "testA": {"acc50": acc / 2, "n": 50}}}

    table = summaries({"mapper": [result(10.0), result(20.0)], "full": [result(4.0)]}, ("val", "testA"))
    assert table["mapper"]["val"].mean == 15.0 and table["mapper"]["testA"].mean == 7.5
    assert table["mapper"]["val"].seeds == 2 and table["full"]["val"].std == 0.0 and table["full"]["val"].n == 50


# --- Parameters -----------------------------------------------------------------------------------------------------


def test_mapper_params_validate_the_grid_and_the_paper_profile():
    params = load({"n_seeds": 3, "seed": 5}, MaPPERParams)
    assert params.seeds() == (5, 6, 7)
    assert params.variant_list() == tuple(VARIANTS)
    problems = {
        "variants": {"variants": "mapper,lorra"},
        "max_len=20": {"variants": "mapper,release", "max_len": 40},
        "lr_drop": {"schedule": "step", "lr_drop": 5, "epochs": 2},
        "visual_backbone": {"visual_backbone": "clip:ViT-B-16"},
        "lr: must be > 0": {"lr": 0},
    }
    for message, values in problems.items():
        with pytest.raises(ConfigError, match=message):
            load(values, MaPPERParams)
    assert load({"variants": "mapper", "max_len": 40}, MaPPERParams).max_len == 40
    with pytest.raises(ConfigError, match="prior_weights: required by the paper profile") as error:
        load({"profile": "paper"}, MaPPERParams)
    assert "visual_weights" in str(error.value) and "text_weights" in str(error.value)


def test_the_study_file_runs_every_variant_with_three_seeds():
    values = study.read_parameter_file(PARAMS_DIR / "03-study.yaml")
    params = load(values, MaPPERParams)
    assert params.variant_list() == tuple(VARIANTS) and params.n_seeds >= 3


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("03-paper*.yaml")), ids=lambda p: p.name)
def test_paper_files_follow_the_release_recipe(path):
    values = study.read_parameter_file(path)
    assert values["profile"] == "paper" and values["lr"] == pytest.approx(1e-4)
    assert values["backbone_lr_scale"] == pytest.approx(0.1) and values["schedule"] == "step"
    assert values["batch_size"] == 32 and values["image_size"] == 518
    assert values["max_len"] == (40 if values["dataset"].startswith("gref") else 20)
    if values["max_len"] != 20:  # the release's prior runs 20 tokens only
        assert "release" not in parse_variants(values["variants"])
    assert values["epochs"] == (180 if values["dataset"] == "unc+" else 90)
    assert values["lr_drop"] == (120 if values["dataset"] == "unc+" else 60)
