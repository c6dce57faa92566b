"""Notebook 02's experiment (vgstudy.hivg_study, HiVGParams) and the HiVG behaviour its cells print or rely on that
tests/models/test_hivg.py does not pin: the bridge's re-weighting and padding mask, the multi-level projection's
initialisation, where LoRA goes and its settings, merging through every stage, and the tiny model's counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vgstudy.config import HiVGParams, load
from vgstudy.data import GroundingTransform, SynthRef
from vgstudy.data.transforms import TransformedDataset
from vgstudy.errors import ConfigError
from vgstudy.hivg_study import (
    ABLATIONS,
    LOSS_TERMS,
    TUNINGS,
    Recipe,
    ablation_names,
    attention_over,
    box_shift,
    build_run,
    compare,
    criterion_for,
    length_bucket,
    pointing,
    reg_attention,
    text_layout,
    trace_shapes,
    trainable_counts,
    tuning_schedule,
)
from vgstudy.models import build
from vgstudy.models.hilora import HILORA_SCHEDULE, RELEASE_EPOCHS, RELEASE_LRS, adapter_names
from vgstudy.models.hivg import CrossModalBridge, HiVG

SIZE = 32  # 2 x 2 patches: fast; the tiny profile's 128 px changes no count below except the head's positions
TEXTS = ["the red circle", "the big blue square on the left of the green star", "a star", "the second ring"]
RECIPE = Recipe(epochs=(1, 1, 1, 1), lrs=(1e-3, 5e-4, 2.5e-4, 1.25e-4))

# hivg-tiny at 128 px (notebook 02's reference): trainable parameters per stage, as the notebook prints them.
TINY_TRAINABLE = {
    "hilora": {"warmup": 3_191_300, "stage1": 3_535_364, "stage2": 3_584_516, "stage3": 3_682_820},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **overrides) -> HiVG:
    torch.manual_seed(seed)
    return build("hivg-tiny", image_size=SIZE, **overrides)


def images(batch: int = 4, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """LoRA B starts at 0 (no effect): give every adapter weight a value so that it changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def reference() -> HiVG:
    torch.manual_seed(0)
    return build_run("hivg-tiny", None, RECIPE, image_size=SIZE)[0].eval()


# --- HiVG behaviour the notebook shows ------------------------------------------------------------------------------


def test_the_bridge_reweights_each_level_per_token_and_channel():
    torch.manual_seed(0)
    bridge = CrossModalBridge(48, 32, 10, 2, heads=4, mlp_dim=96)
    levels = [torch.randn(3, 10, 32) for _ in range(2)]
    with torch.no_grad():
        bridge.level_weights.zero_()  # W = 0: T' = T
        assert torch.allclose(bridge.text_feature(levels), bridge.gate(torch.cat(levels, dim=-1)), atol=1e-6)
        bridge.level_weights.fill_(-1.0)  # W = -1: T' = 0, only the gate's bias is left
        assert torch.allclose(bridge.text_feature(levels), bridge.gate.bias.expand(3, 10, 48), atol=1e-6)
        bridge.level_weights[0, 4].fill_(1.0)  # level 0, token 4 doubled, the rest zeroed
        doubled = [torch.zeros_like(levels[0]), torch.zeros_like(levels[1])]
        doubled[0][:, 4] = 2 * levels[0][:, 4]
        assert torch.allclose(bridge.text_feature(levels), bridge.gate(torch.cat(doubled, dim=-1)), atol=1e-5)


def test_the_fixed_layout_ignores_text_padding_and_the_official_one_does_not():
    torch.manual_seed(0)
    fixed = CrossModalBridge(48, 32, 10, 1, heads=4, mlp_dim=96, text_layout="fixed")
    official = CrossModalBridge(48, 32, 10, 1, heads=4, mlp_dim=96, text_layout="official")
    official.load_state_dict(fixed.state_dict())
    x, level = torch.randn(1, 5, 48), torch.randn(1, 10, 32)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, :6] = True  # 6 real tokens, 4 of padding
    changed = level.clone()
    changed[:, 6:] = torch.randn(1, 4, 32)  # only the padding differs
    assert torch.allclose(fixed(x, [level], mask), fixed(x, [changed], mask), atol=1e-6)
    assert not torch.allclose(official(x, [level], mask), official(x, [changed], mask), atol=1e-4)


def test_the_multi_level_projection_starts_as_clips_projection_of_the_summed_levels(reference):
    vision = reference.clip.visual
    levels = len(reference.config.feature_layers)
    features = [torch.randn(2, 5, vision.width) for _ in range(levels)]
    projected = reference.feature_proj(torch.cat(features, dim=-1)) - reference.feature_proj.bias
    assert torch.allclose(projected, sum(features) @ vision.proj, atol=1e-4)


def test_lora_sits_on_the_attention_projections_only_with_the_releases_settings(reference):
    adapted = {  # CLIP's and the bridges' attention projections; the head trains whole, without LoRA
        name
        for name, _ in reference.named_modules()
        if name.startswith(("clip.", "bridges.")) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
    }
    with_lora = {name.rsplit(".lora_A", 1)[0] for name, _ in reference.named_modules() if name.endswith(".lora_A")}
    blocks = reference.clip.visual.depth + reference.clip.text.depth + len(reference.bridges)
    assert with_lora == adapted and len(with_lora) == 4 * blocks  # q, k, v, out of every block and bridge
    assert not any(".mlp." in name or "embed" in name for name in with_lora)
    layer = reference.clip.visual.blocks[0].attn.q_proj
    (adapter,) = adapter_names(reference)
    assert layer.r[adapter] == 32 and layer.scaling[adapter] == pytest.approx(16 / 32)
    assert layer.lora_dropout[adapter].p == pytest.approx(0.1)
    assert layer.lora_A[adapter].bias is None and layer.lora_B[adapter].bias is None


def test_merging_keeps_the_outputs_through_every_stage():
    model = tiny(hilora_merge=True).eval()
    x = images()
    for k, stage in enumerate(s.name for s in HILORA_SCHEDULE[1:]):
        randomise_lora(model, seed=k)
        before = model(x, TEXTS).boxes
        model.enter_stage(stage)
        assert adapter_names(model) == [stage]
        assert torch.allclose(model(x, TEXTS).boxes, before, atol=1e-5), stage


def test_the_tiny_models_counts_are_the_ones_the_notebook_prints():
    torch.manual_seed(0)
    model = build("hivg-tiny")  # 128 px, as in the notebook
    assert model.trainable_by_stage() == TINY_TRAINABLE["hilora"]
    counts = {tuning: trainable_counts(model, tuning_schedule(tuning)) for tuning in TUNINGS}
    assert counts["hilora"] == TINY_TRAINABLE["hilora"]
    warmup = counts["hilora"]["warmup"]
    assert all(per_stage["warmup"] == warmup for per_stage in counts.values())  # the warm-up never adapts CLIP
    assert set(counts["frozen"].values()) == {warmup}
    assert set(counts["vanilla"].values()) == {warmup, counts["hilora"]["stage3"]}  # all LoRA from stage 1
    clip_total = sum(
        p.numel() for name, p in model.named_parameters() if name.startswith("clip.") and ".lora_" not in name
    )
    assert counts["full"]["stage1"] == warmup + clip_total


# The release built with random weights per data set (design/papers/hivg.md), in millions as recorded there: the
# number of text levels (1 on RefCOCO, 2 on RefCOCO+, 12 on RefCOCOg) changes the bridges' size.
RELEASE_COUNTS_M = {"unc+": (215.37, 65.75), "gref_umd": (236.61, 86.99)}


def release_unused(levels: int, width: int = 512, head: int = 768, text_len: int = 77) -> int:
    """Parameters of the release's modules that its forward pass never reads (vgstudy leaves them out):
    condition_text_proj (width -> head), ml_text_feat_perceiver (levels x width -> head), condition_text_pos_embed
    (text_len x head) and reg_pos_embed (1 x width)."""
    return (width * head + head) + (levels * width * head + head) + text_len * head + width


@pytest.mark.parametrize("dataset", list(RELEASE_COUNTS_M))
def test_hivg_b_counts_per_data_set_are_the_releases(dataset):
    torch.manual_seed(0)
    model = build("hivg-b", dataset=dataset)
    unused = release_unused(len(model.config.text_levels))
    total, trainable = RELEASE_COUNTS_M[dataset]
    stage3 = model.trainable_by_stage()["stage3"]
    assert round((sum(p.numel() for p in model.parameters()) + unused) / 1e6, 2) == total
    assert round((stage3 + unused) / 1e6, 2) == trainable


# --- The ablations --------------------------------------------------------------------------------------------------


def test_ablation_names_parse_all_none_and_refuse_unknown_ones():
    assert ablation_names("all") == tuple(ABLATIONS) and ablation_names("none") == () == ablation_names(" ")
    assert ablation_names(" frozen, bridge-none ") == ("frozen", "bridge-none")
    with pytest.raises(ConfigError, match="unknown: \\['bridge-two'\\]"):
        ablation_names("frozen,bridge-two")
    with pytest.raises(ConfigError, match="distinct"):
        ablation_names("frozen,frozen")


def test_tuning_schedules_keep_the_stage_names_and_change_what_trains():
    names = [s.name for s in HILORA_SCHEDULE]
    for tuning in TUNINGS:
        schedule = tuning_schedule(tuning)
        assert [s.name for s in schedule] == names and schedule[0] == HILORA_SCHEDULE[0]
    assert tuning_schedule("hilora") == HILORA_SCHEDULE
    assert all(s.vision_lora_share == 1.0 and s.text_lora for s in tuning_schedule("vanilla")[1:])
    assert all(s.backbone and s.vision_lora_share == 0 and not s.text_lora for s in tuning_schedule("full")[1:])
    assert all(not s.backbone and s.vision_lora_share == 0 and not s.text_lora for s in tuning_schedule("frozen")[1:])
    with pytest.raises(ConfigError, match="tuning='partial'"):
        tuning_schedule("partial")


def test_criteria_keep_only_the_named_terms():
    assert criterion_for(LOSS_TERMS) == criterion_for(("box", "contrastive", "align", "mask"))
    box = criterion_for(("box",))
    assert (box.contrastive_weight, box.align_focal_weight, box.mask_dice_weight) == (0, 0, 0)
    assert (box.l1_weight, box.giou_weight) == (2.0, 2.0)
    assert criterion_for(("box", "contrastive", "align")).mask_focal_weight == 0
    with pytest.raises(ConfigError, match="expected 'box'"):
        criterion_for(("contrastive",))


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_builds_trains_one_step_and_differs_from_the_reference(name, reference):
    ablation = ABLATIONS[name]
    torch.manual_seed(0)
    model, stages, criterion = build_run("hivg-tiny", ablation, RECIPE, reference.config, image_size=SIZE)
    assert [s.name for s in stages] == [s.name for s in HILORA_SCHEDULE]
    assert [s.lr for s in stages] == list(RECIPE.lrs)
    assert all(dict(s.lr_scale) == ({"clip.": 0.1} if ablation.tuning == "full" else {}) for s in stages)
    model.enter_stage("stage1")
    batch = {
        "boxes_cxcywh": torch.tensor([[0.5, 0.5, 0.25, 0.25]] * 2),
        "masks": torch.ones(2, SIZE, SIZE, dtype=torch.bool),
    }
    terms = criterion(model(images(2), TEXTS[:2]), batch)
    terms["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    clip_own = {n for n in with_grad if n.startswith("clip.") and ".lora_" not in n}
    clip_lora = {n for n in with_grad if n.startswith("clip.") and ".lora_" in n}
    assert any(n.startswith("head.") for n in with_grad) and any(n.startswith("feature_proj.") for n in with_grad)
    assert bool(clip_own) == (ablation.tuning == "full")
    assert bool(clip_lora) == (ablation.tuning in ("hilora", "vanilla"))
    kept = {
        "box": {"l1", "giou"},
        "contrastive": {"contrastive"},
        "align": {"align_focal", "align_dice"},
        "mask": {"mask_focal", "mask_dice"},
    }
    assert set().union(*(kept[term] for term in ablation.losses)) | {"loss"} == set(terms)
    assert (model.config, ablation.losses) != (reference.config, LOSS_TERMS)  # the schedule is part of the config


def test_a_layer_ablation_needs_the_reference_config():
    with pytest.raises(ConfigError, match="reference model's config"):
        build_run("hivg-tiny", ABLATIONS["bridge-single"], RECIPE, image_size=SIZE)


def test_the_release_recipe_fits_the_params():
    params = load({"stage_epochs": list(RELEASE_EPOCHS), "stage_lrs": [str(lr) for lr in RELEASE_LRS]}, HiVGParams)
    assert params.stage_epochs == RELEASE_EPOCHS and params.stage_lrs == RELEASE_LRS


# --- Where the model looks ------------------------------------------------------------------------------------------


def test_reg_attention_returns_the_prediction_and_a_map_over_the_patches(reference):
    x = images()
    reference.train()
    boxes, maps = reg_attention(reference, x, TEXTS)
    assert reference.training  # the mode is restored
    reference.eval()
    assert torch.allclose(boxes, reference(x, TEXTS).boxes, atol=1e-6)
    assert maps.shape == (4, *reference.grid_hw)
    assert (maps >= 0).all() and (maps.flatten(1).sum(dim=1) <= 1 + 1e-5).all()
    assert not reference.head.layers[-1].self_attn._forward_hooks  # the hook is gone
    _, other = reg_attention(reference, images(seed=2), TEXTS)
    assert not torch.allclose(maps, other)


def test_attention_over_a_data_set_matches_one_call_per_batch(reference):
    data = TransformedDataset(SynthRef("val", 5, seed=0, image_size=SIZE), GroundingTransform(reference.transform))
    found = attention_over(reference, data, batch_size=2)
    items = [data[i] for i in range(len(data))]
    boxes, maps = reg_attention(reference, torch.stack([it["image"] for it in items]), [it["text"] for it in items])
    targets = torch.stack([it["box_cxcywh"] for it in items])
    assert torch.allclose(found["boxes_cxcywh"], boxes, atol=1e-5) and torch.equal(found["targets_cxcywh"], targets)
    assert torch.allclose(found["maps"], maps, atol=1e-5)
    assert torch.equal(found["hit"], pointing(maps, targets)["hit"]) and found["chance"].shape == (5,)


def test_pointing_hits_and_chance():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # best cell top-left
    maps[1, 3, 3] = 1.0  # best cell bottom-right
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])  # the top-left quarter: 4 of 16 cells
    result = pointing(maps, boxes)
    assert result["hit"].tolist() == [True, False]
    assert result["chance"].tolist() == [0.25, 0.25]


def test_the_text_layout_switch_and_box_shift(reference):
    x = images()
    others = TEXTS[:1] + ["a yellow cross", "the smallest triangle", "the ring below the star"]  # sample 0 kept
    own = ["a yellow cross"] + TEXTS[1:]  # only sample 0's text changes
    fixed = box_shift(reference, x, TEXTS, others)
    assert fixed.shape == (4,) and fixed[0] < 1e-6 and (fixed[1:] > 1e-4).all()
    assert box_shift(reference, x, TEXTS, own)[0] > 1e-4
    with text_layout(reference, "official"):
        assert all(b.text_layout == "official" for b in reference.bridges.values())
        assert box_shift(reference, x, TEXTS, others)[0] > 1e-4
    assert all(b.text_layout == "fixed" for b in reference.bridges.values())
    with pytest.raises(ConfigError, match="one per image"):
        box_shift(reference, x, TEXTS, TEXTS[:2])


def test_trace_shapes_records_each_module_once_and_removes_its_hooks(reference):
    modules = {"projection": reference.feature_proj, "box": reference.head.box_mlp}
    shapes = trace_shapes(reference, modules, images(2), TEXTS[:2])
    tokens = reference.num_visual_tokens
    width = reference.clip.visual.width * len(reference.config.feature_layers)
    assert shapes == {
        "projection": ((2, tokens, width), (2, tokens, reference.clip.embed_dim)),
        "box": ((2, reference.clip.embed_dim), (2, 4)),
    }
    assert not reference.feature_proj._forward_hooks


# --- Statistics -----------------------------------------------------------------------------------------------------


def test_compare_outcomes():
    # one seed each: the two binomial errors, 100 sqrt(0.24 / 500) each
    assert compare([60.0], [40.0], 500) == pytest.approx(
        {"difference": 20.0, "margin": 2 * (2 * 0.24 / 500) ** 0.5 * 100, "outcome": "holds"}
    )
    assert compare([40.0], [60.0], 500)["outcome"] == "reversed"
    assert compare([50.0], [47.0], 100)["outcome"] == "unresolved"  # within two standard errors
    assert compare([50.0, 52.0, 51.0], [40.0, 41.0, 39.0], 500)["outcome"] == "holds"
    assert compare([50.0, 80.0, 20.0], [40.0, 41.0, 39.0], 500)["outcome"] == "unresolved"  # the seeds disagree


def test_length_buckets():
    buckets = ["1-5", "6-7", "8-10", "11+"]
    assert [length_bucket(" ".join(["w"] * n), buckets) for n in (1, 5, 6, 8, 10, 11, 30)] == [
        "1-5",
        "1-5",
        "6-7",
        "8-10",
        "8-10",
        "11+",
        "11+",
    ]
    assert length_bucket("", buckets) is None


# --- Parameters -----------------------------------------------------------------------------------------------------


def test_params_defaults_are_the_tiny_profile():
    params = load({}, HiVGParams)
    assert params.model_name == "hivg-tiny" and params.ablation_list() == ("bridge-none", "frozen")
    assert params.seeds() == (0,)
    assert dataclasses.replace(params, seed=5, n_seeds=3).seeds() == (5, 6, 7)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stage_epochs": [1, 1]}, "stage_epochs: \\(1, 1\\): expected 4 values"),
        ({"stage_lrs": "1e-3, 0, 1e-4, 1e-5"}, "stage_lrs: .*expected numbers > 0"),
        ({"stage_epochs": "1,0,1,1"}, "stage_epochs: .*expected integers >= 1"),
        ({"ablations": "frozen,bridge-two"}, "ablations: .*unknown"),
        ({"ablations": "no-merge", "hilora_merge": False}, "expected hilora_merge=True"),
        ({"ablations": "official-layout", "text_layout": "official"}, "expected text_layout='fixed'"),
        ({"model_name": "hivg-b"}, "needs real CLIP weights"),
        ({"profile": "paper"}, "clip_weights: required"),
        ({"profile": "paper", "ablations": "none"}, "the paper profile trains hivg-b or hivg-l"),
        ({"text_layout": "release"}, "text_layout: expected one of 'fixed', 'official'"),
    ],
)
def test_bad_params_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        load(values, HiVGParams)
