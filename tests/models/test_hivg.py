"""HiVG: shapes, the bridge and its text layouts, HiLoRA stages through peft, counts and FLOPs against the release."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests._toy import ToyGroundingSet, toy_collate
from vgstudy.checkpoint import load_into
from vgstudy.data.transforms import CLIP_MEAN, IMAGENET_MEAN
from vgstudy.errors import CheckpointError, ConfigError, DataError
from vgstudy.losses_hivg import HiVGCriterion
from vgstudy.models import build, describe
from vgstudy.models.hilora import (
    HILORA_SCHEDULE,
    RELEASE_ADAPTER,
    HiLoRAStage,
    SplitAttention,
    adapter_names,
    trainer_stages,
)
from vgstudy.models.hivg import CrossModalBridge, HiVG, map_layer_indices
from vgstudy.train import TrainConfig, Trainer

TEXTS = ["the red circle", "the big blue square on the left of the green star"]
OTHER_TEXTS = ["the red circle", "a small yellow triangle at the bottom right corner"]

# The release built with random weights (ViT-B/16, RefCOCO, final stage): papers/hivg.md.
RELEASE_TOTAL, RELEASE_TRAINABLE = 213_244_677, 63_623_940
RELEASE_STAGES = {"warmup": 59.69e6, "stage1": 62.25e6, "stage2": 62.84e6, "stage3": 63.62e6}
RELEASE_GFLOPS = 74.9
# The release's parameters that its forward pass never reads, left out here (condition_text_proj,
# ml_text_feat_perceiver, condition_text_pos_embed, reg_pos_embed).
RELEASE_UNUSED = 393_984 + 393_984 + 77 * 768 + 512
SIZE = 32


def tiny(seed: int = 0, image_size: int = SIZE, **overrides) -> HiVG:
    """hivg-tiny, at 32 px by default (2 x 2 patches) to keep the tests fast; 128 px is its profile's size."""
    torch.manual_seed(seed)
    return build("hivg-tiny", image_size=image_size, **overrides)


def images(batch: int = 2, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise_lora(model: nn.Module, seed: int = 0) -> None:
    """LoRA B starts at 0 (no effect); give every adapter weight a value so that LoRA changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def batch_for(model: HiVG, size: int = 2) -> dict:
    s = model.image_size
    masks = torch.zeros(size, s, s, dtype=torch.bool)
    masks[:, s // 4 : s // 2, s // 4 : s // 2] = True
    return {
        "images": images(size, s),
        "texts": TEXTS[:size],
        "boxes_cxcywh": torch.tensor([[0.375, 0.375, 0.25, 0.25]] * size),
        "masks": masks,
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors on 2 shared cores: one intra-op thread is several times faster than two that wait for each
    other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


@pytest.fixture(scope="module")
def model_128():
    torch.manual_seed(0)
    return build("hivg-tiny").eval()


# --- Shapes and inputs ----------------------------------------------------------------------------------------------


def test_forward_gives_boxes_in_the_unit_square_and_the_auxiliary_outputs(model_128):
    model = model_128
    out = model(images(size=128), TEXTS)
    assert out.boxes.shape == (2, 4)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert out.aux["logits_per_text"].shape == (2, 2)
    assert out.aux["patch_text_logits"].shape == (2, 64)  # 8 x 8 patches at 128 px
    assert out.aux["mask_logits"].shape == (2, 64, 64)  # 8 x the patch grid
    assert model.head.num_tokens == 1 + 64 + 32  # CLS + patches + clip:tiny's 32 text tokens


def test_the_release_layers_are_mapped_onto_the_tiny_towers(model_128, capsys):
    model = model_128
    assert model.config.bridge_layers == (0, 1, 3, 5)
    assert model.config.feature_layers == (0, 1, 3, 5)
    assert model.config.text_levels == (5,)  # RefCOCO: the last text block
    assert sorted(model.bridges) == ["0", "1", "3", "5"]
    assert tiny(dataset="unc+").config.text_levels == (2, 5)
    assert "(0, 3, 7, 11) of 12 blocks -> (0, 1, 3, 5) of 6" in capsys.readouterr().out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 23), min_size=1, max_size=8, unique=True).map(sorted),
    st.integers(1, 24),
)
def test_mapped_layer_indices_are_increasing_in_range_and_keep_the_ends(indices, to_depth):
    from_depth = 24
    mapped = map_layer_indices(indices, from_depth, to_depth)
    assert all(0 <= i < to_depth for i in mapped)
    assert list(mapped) == sorted(set(mapped))
    if from_depth - 1 in indices:
        assert mapped[-1] == to_depth - 1
    assert map_layer_indices(indices, from_depth, from_depth) == tuple(indices)


def test_bad_inputs_are_data_errors(model):
    with pytest.raises(DataError, match=r"expected \(B, 3, 32, 32\)"):
        model(images(size=48), TEXTS)
    with pytest.raises(DataError, match="one per image"):
        model(images(), TEXTS[:1])
    with pytest.raises(DataError, match="valid of shape"):
        model(images(), TEXTS, valid=torch.ones(2, 16, 16, dtype=torch.bool))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_layout": "release"}, "text_layout='release'"),
        ({"hilora_merge": "yes"}, "hilora_merge='yes'"),
        ({"bridge_layers": (3, 9)}, r"bridge_layers=\(3, 9\): expected block indices below the tower's depth 6"),
        ({"bridge_layers": (3, 1)}, "increasing"),
        ({"dataset": "coco"}, "dataset='coco'"),
        ({"normalisation": "none"}, "normalisation='none'"),
        ({"lora_rank": 0}, "rank=0"),
        ({"schedule": (HiLoRAStage("a"), HiLoRAStage("a"))}, "distinct"),
        ({"bridge_width": 3}, "HiVG overrides \\['bridge_width'\\]"),
    ],
)
def test_bad_overrides_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build("hivg-tiny", image_size=SIZE, **overrides)


def test_padded_patches_are_masked_in_the_head(model):
    x = images()
    valid = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    assert torch.allclose(model(x, TEXTS, valid=valid).boxes, model(x, TEXTS).boxes, atol=1e-6)
    valid[:, :, SIZE // 2 :] = False  # the right half is padding
    assert not torch.allclose(model(x, TEXTS, valid=valid).boxes, model(x, TEXTS).boxes, atol=1e-4)


def test_normalisation_follows_the_release_unless_clip_is_asked_for(model, model_128):
    assert model.transform.mean == IMAGENET_MEAN and model_128.transform.image_size == 128
    assert tiny(normalisation="clip").transform.mean == CLIP_MEAN


def test_ablations_build_and_run():
    for overrides in (
        {"bridge_layers": "none"},
        {"bridge_layers": (5,)},
        {"feature_layers": (5,)},
        {"adaptive_weights": False},
        {"auxiliary_heads": False},
    ):
        hivg = tiny(**overrides).eval()
        out = hivg(images(), TEXTS)
        assert out.boxes.shape == (2, 4), overrides
    assert len(tiny(bridge_layers="none").bridges) == 0
    assert tiny(feature_layers=(5,)).feature_proj.in_features == 192
    assert tiny(adaptive_weights=False).bridges["0"].level_weights is None
    assert set(out.aux) == {"logits_per_text"}  # auxiliary_heads=False
    with pytest.raises(ConfigError, match="auxiliary_heads=False"):
        HiVGCriterion()(out, batch_for(hivg))


def test_split_attention_equals_open_clips_multihead_attention():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    split = SplitAttention.from_multihead(attention)
    x = torch.randn(3, 7, 32)
    causal = torch.full((7, 7), float("-inf")).triu_(1)
    expected = attention(x, x, x, need_weights=False, attn_mask=causal)[0]
    assert torch.allclose(split(x, x, x, attn_mask=causal)[0], expected, atol=1e-6)


# --- The bridge's text layout ---------------------------------------------------------------------------------------


def test_the_official_layout_is_the_fixed_one_for_a_single_unpadded_sample():
    torch.manual_seed(0)
    fixed = CrossModalBridge(48, 32, 10, 2, heads=4, mlp_dim=96, text_layout="fixed")
    official = CrossModalBridge(48, 32, 10, 2, heads=4, mlp_dim=96, text_layout="official")
    official.load_state_dict(fixed.state_dict())
    x, levels, mask = torch.randn(1, 5, 48), [torch.randn(1, 10, 32) for _ in range(2)], torch.ones(1, 10, dtype=bool)
    assert torch.allclose(official(x, levels, mask), fixed(x, levels, mask), atol=1e-6)
    x2, levels2, mask2 = (
        x.expand(2, -1, -1),
        [torch.cat([t, torch.randn(1, 10, 32)]) for t in levels],
        mask.expand(2, -1),
    )
    assert torch.allclose(fixed(x2, levels2, mask2)[0], fixed(x, levels, mask)[0], atol=1e-6)
    assert not torch.allclose(official(x2, levels2, mask2)[0], official(x, levels, mask)[0], atol=1e-3)


def release_cross_attention(attention: SplitAttention, image: torch.Tensor, text_lbd: torch.Tensor) -> torch.Tensor:
    """The release's CLIP_Cross_Attention step by step: image (B, T, D) queries; the text arrives as (L, B, D) and
    its projections are split into heads with `.view(B, -1, heads, head_dim)`."""
    b, t, d = image.shape
    h = attention.heads
    q = (attention.q_proj(image) * (d // h) ** -0.5).view(b, t, h, d // h).transpose(1, 2)
    k = attention.k_proj(text_lbd).view(b, -1, h, d // h).transpose(1, 2)
    v = attention.v_proj(text_lbd).view(b, -1, h, d // h).transpose(1, 2)
    out = (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v  # (B, heads, T, D / heads)
    return attention.out_proj(out.transpose(1, 2).reshape(b, t, d))


def test_the_official_layout_computes_what_the_release_does():
    torch.manual_seed(0)
    bridge = CrossModalBridge(48, 32, 10, 2, heads=4, mlp_dim=96, text_layout="official")
    x, levels = torch.randn(3, 5, 48), [torch.randn(3, 10, 32) for _ in range(2)]
    text = bridge.text_feature(levels).permute(1, 0, 2)  # (L, B, D), as the release passes it
    expected = x + bridge.mlp(release_cross_attention(bridge.attn, bridge.norm(x), text))
    assert torch.allclose(bridge(x, levels, torch.ones(3, 10, dtype=torch.bool)), expected, atol=1e-5)


def test_under_the_official_layout_a_prediction_depends_on_the_rest_of_its_batch():
    fixed = tiny(text_layout="fixed").eval()
    official = tiny(text_layout="official").eval()
    official.load_state_dict(fixed.state_dict())
    x = images()
    for hivg, mixes in ((fixed, False), (official, True)):
        first = hivg(x, TEXTS).boxes[0]
        other_batch = hivg(x, OTHER_TEXTS).boxes[0]  # same image and text for sample 0, another text for sample 1
        assert torch.allclose(first, other_batch, atol=1e-5) != mixes, hivg.config.text_layout


# --- HiLoRA ---------------------------------------------------------------------------------------------------------


def test_trainer_stages_follow_the_schedule():
    stages = trainer_stages()
    assert [s.name for s in stages] == [s.name for s in HILORA_SCHEDULE] == ["warmup", "stage1", "stage2", "stage3"]
    assert [s.epochs for s in stages] == [60, 20, 20, 20] and [s.lr for s in stages] == [2.5e-4, 1e-4, 5e-5, 2.5e-5]
    assert [s.vision_blocks_open(12) for s in HILORA_SCHEDULE] == [0, 5, 8, 12]  # blocks 0-4, 0-7, 0-11
    assert [s.vision_blocks_open(6) for s in HILORA_SCHEDULE] == [0, 3, 4, 6]
    with pytest.raises(ConfigError, match="one of each per stage"):
        trainer_stages(epochs=(1, 1))
    with pytest.raises(ConfigError, match="vision_lora_share=1.5"):
        HiLoRAStage("s", vision_lora_share=1.5)


def lora_blocks(names: set[str], tower: str) -> set[int]:
    return {int(n.split(".")[4]) for n in names if n.startswith(f"clip.{tower}.") and ".lora_" in n}


@pytest.mark.parametrize("merge", [True, False], ids=["paper", "release"])
def test_gradients_reach_exactly_what_each_stage_trains(merge):
    hivg = tiny(hilora_merge=merge).train()
    randomise_lora(hivg)  # so that every LoRA A gets a gradient too
    batch = batch_for(hivg)
    for stage, vision_blocks, text in [
        ("warmup", set(), False),
        ("stage1", {0, 1, 2}, True),
        ("stage3", set(range(6)), True),
    ]:
        hivg.enter_stage(stage)
        randomise_lora(hivg)
        hivg.zero_grad(set_to_none=True)
        HiVGCriterion()(hivg(batch["images"], batch["texts"]), batch)["loss"].backward()
        trainable = {n for n, p in hivg.named_parameters() if p.requires_grad}
        with_grad = {n for n, p in hivg.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert with_grad == trainable, stage
        assert lora_blocks(with_grad, "visual") == vision_blocks
        assert bool(lora_blocks(with_grad, "text")) == text
        assert not any(n.startswith("clip.") and ".lora_" not in n for n in with_grad)  # CLIP's own weights
        assert any(n.startswith("bridges.0.attn.q_proj.lora_B") for n in with_grad)  # the bridge's LoRA, always
        assert any(n.startswith("head.") for n in with_grad) and any(n.startswith("mask_head.") for n in with_grad)


def test_merging_a_stage_keeps_the_outputs_and_starts_a_fresh_adapter():
    hivg = tiny(hilora_merge=True).eval()
    randomise_lora(hivg)
    x = images()
    before = hivg(x, TEXTS)
    base = hivg.clip.visual.blocks[0].attn.q_proj.base_layer.weight.clone()
    hivg.enter_stage("stage1")
    after = hivg(x, TEXTS)
    assert adapter_names(hivg) == ["stage1"]
    assert not torch.equal(hivg.clip.visual.blocks[0].attn.q_proj.base_layer.weight, base)  # the delta is merged
    assert (hivg.clip.visual.blocks[0].attn.q_proj.lora_B["stage1"].weight == 0).all()  # the new adapter starts at 0
    assert torch.allclose(after.boxes, before.boxes, atol=1e-5)
    for key in before.aux:
        assert torch.allclose(
            after.aux[key], before.aux[key], atol=1e-4 * float(before.aux[key].detach().abs().max())
        ), key


def test_the_release_trains_one_adapter_throughout():
    hivg = tiny(hilora_merge=False).eval()
    randomise_lora(hivg)
    before = hivg(images(), TEXTS).boxes
    hivg.enter_stage("stage3")
    assert adapter_names(hivg) == [RELEASE_ADAPTER]
    assert torch.equal(hivg(images(), TEXTS).boxes, before)


def test_stages_run_in_order():
    hivg = tiny()
    hivg.enter_stage("stage2")  # passes through stage1
    assert hivg.stage == "stage2"
    hivg.enter_stage("stage2")  # again: nothing changes
    with pytest.raises(ConfigError, match="already in the later stage 'stage2'"):
        hivg.enter_stage("stage1")
    with pytest.raises(ConfigError, match="expected one of the schedule's stages"):
        hivg.enter_stage("stage4")


@pytest.mark.parametrize("merge", [True, False], ids=["paper", "release"])
def test_replaying_the_stages_on_a_fresh_model_loads_a_checkpoint_strictly(merge):
    trained = tiny(seed=0, hilora_merge=merge).eval()
    trained.enter_stage("stage2")
    randomise_lora(trained)
    state = trained.state_dict()
    fresh = tiny(seed=1, hilora_merge=merge).eval()
    if merge:  # a model in another stage has other adapter names
        with pytest.raises(CheckpointError, match="missing"):
            load_into(fresh, state)
    fresh.enter_stage("stage2")
    load_into(fresh, state)
    assert torch.equal(fresh(images(), TEXTS).boxes, trained(images(), TEXTS).boxes)


def hivg_trainer(run_dir, criterion=None) -> Trainer:
    """A HiVG on clip:tiny at 32 px (2 x 2 patches) through warm-up and stage 1 of HiLoRA on the toy set."""
    torch.manual_seed(0)
    hivg = build("hivg-tiny", image_size=32, hilora_merge=True)
    stages = trainer_stages(HILORA_SCHEDULE[:2], epochs=(1, 1), lrs=(1e-3, 1e-3))
    config = TrainConfig(stages=stages, batch_size=4, checkpoint_every_steps=1, log_every_steps=1, keep_checkpoints=8)
    loss = criterion or HiVGCriterion()
    return Trainer(hivg, loss, ToyGroundingSet(8), config, run_dir, collate_fn=toy_collate)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    trainer = hivg_trainer(tmp_path_factory.mktemp("hivg-reference"))
    trainer.fit()
    return trainer.model.state_dict()


class CrashingCriterion:
    """HiVG's criterion until its `n`-th call, when the run dies."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, output, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt(f"crash at call {self.n}")
        return HiVGCriterion()(output, batch)


@pytest.mark.parametrize("crash_call", [3, 4], ids=["at-the-stage-boundary", "mid-stage"])
def test_a_crashed_hilora_run_resumes_to_the_same_weights(tmp_path, reference_run, crash_call):
    with pytest.raises(KeyboardInterrupt):
        hivg_trainer(tmp_path, criterion=CrashingCriterion(crash_call)).fit()
    trainer = hivg_trainer(tmp_path)
    results = trainer.fit(resume="auto")
    assert results["resumed_from"] is not None
    assert trainer.model.stage == "stage1" and adapter_names(trainer.model) == ["stage1"]
    weights = trainer.model.state_dict()
    assert weights.keys() == reference_run.keys()
    assert not [key for key in weights if not torch.equal(weights[key], reference_run[key])]


# --- Counts and FLOPs at full size ----------------------------------------------------------------------------------


def flops_at_batch_1(hivg: HiVG) -> int:
    """FLOPs of one forward pass at batch 1, counted on fake tensors (shapes only, no arithmetic). The math SDPA
    kernel is forced because torch's FLOP counter has no formula for the CPU flash-attention kernel."""
    size = hivg.image_size
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        hivg(torch.empty(1, 3, size, size), ["the man on the left"])
    return c.get_total_flops()


@pytest.fixture(scope="module")
def hivg_b():
    torch.manual_seed(0)
    return build("hivg-b").eval()


def test_hivg_b_has_the_releases_parameters_and_flops(hivg_b):
    counts = describe(hivg_b)
    assert counts["total"] == 212_397_061 == RELEASE_TOTAL - RELEASE_UNUSED
    assert counts["total"] == pytest.approx(RELEASE_TOTAL, rel=0.02)
    assert counts["parts"]["bridges"]["total"] == 4 * 7_716_352  # 4 x 7.52 M + its LoRA (4 x 0.197 M)
    by_stage = hivg_b.trainable_by_stage()
    assert by_stage == {"warmup": 58_844_164, "stage1": 61_400_068, "stage2": 61_989_892, "stage3": 62_776_324}
    assert by_stage["stage3"] == RELEASE_TRAINABLE - RELEASE_UNUSED
    for stage, reported in RELEASE_STAGES.items():
        assert by_stage[stage] == pytest.approx(reported, rel=0.02), stage
    assert counts["trainable"] == by_stage["warmup"]  # a fresh model is in the warm-up
    assert hivg_b.head.num_tokens == 274  # + [REG] = 275
    flops = flops_at_batch_1(hivg_b)
    assert flops == 74_917_438_464  # 37.46 GMACs
    assert flops / 1e9 == pytest.approx(RELEASE_GFLOPS, rel=0.02)


@pytest.mark.slow
def test_hivg_l_counts():
    torch.manual_seed(0)
    hivg_l = build("hivg-l").eval()
    assert hivg_l.config.bridge_layers == (4, 10, 16, 22) and hivg_l.config.feature_layers == (5, 11, 17, 23)
    assert describe(hivg_l)["total"] == 541_736_197
    assert hivg_l.trainable_by_stage() == {
        "warmup": 105_468_932,
        "stage1": 110_449_668,
        "stage2": 112_022_532,
        "stage3": 114_119_684,
    }
    assert flops_at_batch_1(hivg_l) == 257_042_888_192
