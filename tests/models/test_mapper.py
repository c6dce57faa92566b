import copy
import dataclasses

import pytest
import torch

from vgstudy.data.tokenizers import TokenBatch
from vgstudy.errors import ConfigError, DataError
from vgstudy.models import build, describe, model_names
from vgstudy.models.backbones import build_backbone
from vgstudy.models.mapper import (
    DEVIATIONS,
    LR_SCALE,
    BertLayerWithParallelAdapter,
    DynamicPriorAdapter,
    LocalConvAdapter,
    MaPPERConfig,
    ReleaseDeviations,
    ViTBlockWithParallelAdapter,
    build_mapper,
    map_positions,
    tiny_config,
)
from vgstudy.train import Stage, parameter_groups

TEXTS = ["the red circle", "the big blue square on the left of the green star"]


@pytest.fixture(scope="module")
def tiny_backbones():
    torch.manual_seed(0)
    return {
        "visual_module": build_backbone("dinov2:tiny"),
        "text_module": build_backbone("bert:minilm", max_len=20),
        "prior_module": build_backbone("clip:tiny", max_len=20),
    }


@pytest.fixture(scope="module")
def reg4():
    torch.manual_seed(0)
    return build_backbone("dinov2:tiny-reg4")


def _tiny(backbones, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_mapper(tiny_config(show=False), {**backbones, **overrides}).eval()


@pytest.fixture(scope="module")
def paper(tiny_backbones):
    return _tiny(tiny_backbones)


@pytest.fixture(scope="module")
def release(tiny_backbones):
    return _tiny(tiny_backbones, fidelity="release")


def _images(batch=2, size=128, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _flipped(model, **flags):
    """A copy of `model` (same weights) running with some deviation flags changed."""
    other = copy.deepcopy(model)
    other.deviations = dataclasses.replace(model.deviations, **flags)
    return other


def _run(model, images=None, texts=TEXTS, valid=None):
    with torch.no_grad():
        return model(_images() if images is None else images, texts, valid)


# --- Positions ------------------------------------------------------------------------------------------------------


def test_map_positions_keeps_relative_depth_and_prints(capsys):
    assert map_positions((3, 7, 11), 6, name="LoCA") == {3: 1, 7: 3, 11: 5}
    assert "LoCA: blocks 3, 7, 11 of 12 -> 1, 3, 5 of 6" in capsys.readouterr().out
    assert map_positions((3, 7, 11), 12, show=False) == {3: 3, 7: 7, 11: 11}
    assert map_positions((3, 7, 11), 24, show=False) == {3: 7, 7: 15, 11: 23}
    assert tiny_config(show=False)["visual_positions"] == (1, 3, 5)


def test_map_positions_refuses_collisions_and_out_of_range():
    with pytest.raises(ConfigError, match="collide"):
        map_positions((3, 7, 11), 2, show=False)
    with pytest.raises(ConfigError, match=r"\[0, 12\)"):
        map_positions((12,), 6, show=False)


# --- The model ------------------------------------------------------------------------------------------------------


def test_forward_shapes_and_boxes_in_the_unit_square(paper):
    out = _run(paper)
    assert out.boxes.shape == (2, 4)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert out.aux["visual_tokens"].shape == (2, 1 + 8 * 8, 128)  # CLS + the 8 x 8 grid, projected to the fusion
    assert out.aux["text_tokens"].shape == (2, 20, 128)
    assert out.aux["prior"].shape == (2, 20, 128)  # clip:tiny's projected width
    assert out.aux["text_mask"][0].sum() < out.aux["text_mask"][1].sum()
    assert paper.head.pos_embed.weight.shape[0] == 1 + 20 + 1 + 64


def test_registered_names_and_overrides(tiny_backbones):
    assert {"mapper-b", "mapper-tiny"} <= set(model_names())
    model = build("mapper-tiny", use_loca=False, dypa_rank=4, **tiny_backbones)
    assert not any(isinstance(m, LocalConvAdapter) for m in model.modules())
    assert all(m.down.out_features == 4 for m in model.modules() if isinstance(m, DynamicPriorAdapter))
    with pytest.raises(ConfigError, match="loca_widht"):
        build("mapper-tiny", loca_widht=3, **tiny_backbones)


def test_the_given_backbones_are_copied_not_changed(tiny_backbones, paper):
    assert not any(isinstance(b, ViTBlockWithParallelAdapter) for b in tiny_backbones["visual_module"].blocks)
    assert paper.visual is not tiny_backbones["visual_module"]
    assert all(p.requires_grad for p in tiny_backbones["text_module"].parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loca_hidden": 80}, "loca_1x1 \\+ loca_3x3"),
        ({"use_prior": False}, "use_pgt=True needs use_prior"),
        ({"fidelity": "official"}, "fidelity='official'"),
        ({"visual_positions": (1, 1)}, "distinct"),
        ({"dropout": "0.1"}, "dropout"),
        ({"random_prior_blocks": "yes"}, "random_prior_blocks"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MaPPERConfig(**overrides)


def test_positions_beyond_the_backbone_are_refused(tiny_backbones):
    with pytest.raises(ConfigError, match="visual_positions=\\(3, 7, 11\\).*6 blocks"):
        _tiny(tiny_backbones, visual_positions=(3, 7, 11))


def test_bad_inputs_are_data_errors(paper):
    with pytest.raises(DataError, match="expected \\(B, 3, 128, 128\\)"):
        paper(_images(size=96), TEXTS)
    with pytest.raises(DataError, match="one per image"):
        paper(_images(), TEXTS[:1])
    with pytest.raises(DataError, match="valid of shape"):
        paper(_images(), TEXTS, torch.ones(2, 64, 64, dtype=torch.bool))


def test_image_padding_masks_the_padded_cells_but_never_cls(paper):
    valid = torch.ones(2, 128, 128, dtype=torch.bool)
    valid[:, :, 64:] = False  # the right half is padding
    out = _run(paper, valid=valid)
    mask = out.aux["visual_mask"]  # True on real tokens: CLS, then 8 x 8 cells
    assert mask[:, 0].all()
    grid = mask[:, 1:].reshape(2, 8, 8)
    assert grid[:, :, :4].all() and not grid[:, :, 4:].any()


# --- The adapters ---------------------------------------------------------------------------------------------------


def test_loca_is_local_and_lets_prefix_tokens_skip_the_convolutions():
    torch.manual_seed(0)
    loca = LocalConvAdapter(16, 12, 8, 2, 4, grid_hw=(5, 5), num_prefix_tokens=2).eval()
    x = torch.randn(1, 2 + 25, 16)
    changed = x.clone()
    changed[0, 2 + 2 * 5 + 2] += 1.0  # the centre cell (2, 2)
    difference = (loca(changed) - loca(x)).abs().sum(-1)[0]  # (2 + 25,)
    assert difference[:2].max() == 0  # the prefix tokens do not see the grid
    moved = difference[2:].reshape(5, 5) > 0
    assert moved[1:4, 1:4].all() and moved.sum() == 9  # the 3x3 neighbourhood, nothing else
    prefix = torch.relu(loca.down(x[:, :2]))
    torch.testing.assert_close(loca(x)[:, :2], loca.up(2 * prefix))  # twice its projection, as the release's CLS


def test_loca_parallel_to_the_mlp_leaves_the_timm_block_and_its_names(tiny_backbones):
    block = copy.deepcopy(tiny_backbones["visual_module"].blocks[0]).eval()
    x = torch.randn(2, 65, 192)
    loca = LocalConvAdapter(192, 72, 48, 6, 24, (8, 8), 1).eval()
    wrapped = ViTBlockWithParallelAdapter(block, loca, scale=0.0)
    torch.testing.assert_close(wrapped(x), block(x))
    assert set(wrapped.state_dict()) == set(block.state_dict()) | {f"adapter.{k}" for k in loca.state_dict()}
    wrapped.scale = 0.2
    h = block.norm2(x + block.ls1(block.attn(block.norm1(x))))
    expected = x + block.ls1(block.attn(block.norm1(x))) + block.ls2(block.mlp(h) + 0.2 * loca(h))
    torch.testing.assert_close(wrapped(x), expected)


def test_dypa_scales_each_token_by_its_prior():
    torch.manual_seed(0)
    dypa = DynamicPriorAdapter(16, 4, prior_dim=8)
    torch.nn.init.normal_(dypa.up.weight)  # the zero start would hide the scaling
    tokens, prior = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    plain = dypa.up(torch.relu(dypa.down(dypa.norm(tokens))))
    scale = torch.relu(dypa.scale(dypa.prior_norm(prior)))
    torch.testing.assert_close(dypa(tokens, prior), plain * scale)
    assert (scale == 0).any() and (scale > 0).any()  # ReLU gates some tokens off
    with pytest.raises(ValueError, match="expected prior"):
        dypa(tokens)
    assert torch.equal(DynamicPriorAdapter(16, 4, prior_dim=8).up.weight, torch.zeros(16, 4))


def test_dypa_parallel_to_the_ffn_of_a_bert_layer(tiny_backbones):
    layer = copy.deepcopy(tiny_backbones["text_module"].blocks[0]).eval()
    x = torch.randn(2, 20, 384)
    dypa = DynamicPriorAdapter(384, 16, prior_dim=128)
    wrapped = BertLayerWithParallelAdapter(layer, dypa)
    prior = torch.randn(2, 20, 128)
    torch.testing.assert_close(wrapped(x, None, prior), layer(x, None))  # the zero up-projection adds nothing
    torch.nn.init.normal_(dypa.up.weight)
    a = layer.attention(x, None)[0]
    torch.testing.assert_close(wrapped(x, None, prior), layer(x, None) + dypa(a, prior))


# --- Counts ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size():
    """MaPPER-B's backbones: DINOv2-B and BERT-base on the meta device (shapes only), CLIP ViT-B/16 for real."""
    with torch.device("meta"):
        visual = build_backbone("dinov2:vit_base_patch14_dinov2")
        text = build_backbone("bert:base")
    prior = build_backbone("clip:ViT-B-16-quickgelu", max_len=20)
    return {"visual_module": visual, "text_module": text, "prior_module": prior}


def _parts(module):
    return {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}


def test_the_headline_count_2774043_over_196_06_m_and_its_breakdown(full_size):
    model = build("mapper-b", fidelity="release", **full_size)
    count = model.tunable_count()
    assert count.tunable == 2_774_043
    assert count.backbone == 196_061_952 and f"{count.backbone / 1e6:.2f} M" == "196.06 M"
    assert f"{100 * count.share:.2f}%" == "1.41%"
    assert count.modules == {
        "visual.blocks.3.adapter": 527_304,
        "visual.blocks.7.adapter": 527_304,
        "visual.blocks.11.adapter": 527_304,
        "text.encoder.layer.3.adapter": 69_441,
        "text.encoder.layer.7.adapter": 69_441,
        "text.encoder.layer.11.adapter": 69_441,
        "pgt": 983_808,
    }
    loca = _parts(model.visual.blocks[3].adapter)
    assert loca == {"down": 221_472, "conv_1x1": 55_872, "conv_3x3_reduce": 6_984, "conv_3x3": 21_024, "up": 221_952}
    dypa = _parts(model.text.blocks[3].adapter)
    assert dypa == {
        "norm": 1_536,
        "down": 24_608,
        "up": 25_344,
        "prior_norm": 1_024,
        "scale": 513,
        "prior_down": 16_416,
    }
    assert model.head.pos_embed.weight.shape == (1 + 20 + 1370, 256)  # the release's vl_pos_embed: 1391 rows
    assert "2,774,043" in str(count) and "1.41% tunable" in str(count)


def test_the_paper_count_leaves_the_unused_projection_out(full_size):
    count = build("mapper-b", **full_size).tunable_count()
    assert count.tunable == 2_724_795 == 2_774_043 - 3 * 16_416
    assert count.modules["text.encoder.layer.7.adapter"] == 53_025


def test_tiny_counts(paper, release):
    count = paper.tunable_count()
    assert count.modules["visual.blocks.1.adapter"] == 33_330  # 192 -> 72 -> (48 | 6 -> 24) -> 192
    assert count.modules["text.encoder.layer.1.adapter"] == 13_841  # 384 -> 16 -> 384, prior 128
    assert count.modules["pgt"] == (384 + 128) * 384 + 384
    assert count.tunable == 3 * 33_330 + 3 * 13_841 + 196_992 == 338_505
    assert release.tunable_count().tunable == 338_505 + 3 * (128 * 16 + 16)
    parts = describe(paper)["parts"]
    assert parts["prior"]["trainable"] == 0 and parts["head"]["trainable"] == parts["head"]["total"]


# --- Training -------------------------------------------------------------------------------------------------------


def test_frozen_backbones_get_no_gradient_and_adapters_and_head_do(tiny_backbones):
    model = _tiny(tiny_backbones, fidelity="release").train()
    out = model(_images(), TEXTS)
    (out.boxes.sum() + out.aux["reg"].sum()).backward()
    adapters = {
        id(p) for m in model.modules() if isinstance(m, (LocalConvAdapter, DynamicPriorAdapter)) for p in m.parameters()
    }
    for name, p in model.named_parameters():
        if name.startswith(("visual.", "text.", "prior.")) and id(p) not in adapters:
            assert not p.requires_grad and p.grad is None, name
        elif ".prior_down." in name:
            assert p.requires_grad and p.grad is None, name  # the release's unused projection
        else:
            assert p.requires_grad and p.grad is not None, name
    assert model.visual.blocks[1].adapter.down.weight.grad.abs().sum() > 0
    assert model.text.blocks[1].adapter.up.weight.grad.abs().sum() > 0
    assert model.pgt.proj.weight.grad.abs().sum() > 0


def test_adapters_train_at_a_tenth_of_the_learning_rate(paper):
    groups = parameter_groups(paper, Stage(name="main", epochs=1, lr=1e-4, lr_scale=LR_SCALE), weight_decay=1e-4)
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert rate[id(paper.visual.blocks[1].adapter.down.weight)] == pytest.approx(1e-5)
    assert rate[id(paper.text.blocks[3].adapter.scale.weight)] == pytest.approx(1e-5)
    assert rate[id(paper.pgt.proj.weight)] == pytest.approx(1e-4)
    assert rate[id(paper.head.layers[0].linear1.weight)] == pytest.approx(1e-4)


# --- Prior on / off -------------------------------------------------------------------------------------------------


def test_without_the_prior_dypa_has_scale_one_and_there_is_no_clip(tiny_backbones):
    model = _tiny(tiny_backbones, use_prior=False, use_pgt=False)
    assert model.prior is None and model.pgt is None
    dypa = model.text.blocks[1].adapter
    assert dypa.scale is None and dypa.prior_norm is None
    assert model.tunable_count().modules["text.encoder.layer.1.adapter"] == 768 + 384 * 16 + 16 + 16 * 384 + 384
    out = _run(model)
    assert "prior" not in out.aux and out.boxes.shape == (2, 4)


def test_the_prior_changes_the_text_branch_only_through_dypa_and_pgt(paper):
    other = copy.deepcopy(paper)
    with torch.no_grad():
        for layer in other.text.blocks:
            if isinstance(layer, BertLayerWithParallelAdapter):
                torch.nn.init.normal_(layer.adapter.up.weight)
    texts = ["the red circle", "a red circle"]
    batch = other.text.tokenize(texts)
    prior = other.prior_features(texts, batch)
    with torch.no_grad():
        tokens = other._text_tokens(batch, prior)
        assert not torch.allclose(tokens, other._text_tokens(batch, torch.zeros_like(prior)))


# --- Fidelity -------------------------------------------------------------------------------------------------------


def test_fidelity_sets_every_flag_and_single_flags_override_it():
    assert ReleaseDeviations.of("paper") == ReleaseDeviations()
    assert all(dataclasses.asdict(ReleaseDeviations.of("release")).values())
    mixed = MaPPERConfig(fidelity="release", drop_registers=False).deviations()
    assert not mixed.drop_registers and all(getattr(mixed, name) for name in DEVIATIONS if name != "drop_registers")
    assert MaPPERConfig(bert_ids_for_prior=True).deviations() == ReleaseDeviations(bert_ids_for_prior=True)


def test_random_prior_blocks_randomise_only_the_blocks_deterministically(tiny_backbones, paper):
    given = tiny_backbones["prior_module"].text.state_dict()
    a = _tiny(tiny_backbones, random_prior_blocks=True).prior.state_dict()
    b = _tiny(tiny_backbones, seed=5, random_prior_blocks=True).prior.state_dict()
    c = _tiny(tiny_backbones, random_prior_blocks=True, prior_seed=1).prior.state_dict()
    for key, value in given.items():
        if "resblocks" in key and key.endswith(("in_proj_weight", "c_fc.weight")):
            assert not torch.equal(a[key], value) and torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
        elif "resblocks" not in key:
            assert torch.equal(a[key], value), key  # embeddings, ln_final, projection stay pretrained
    assert torch.equal(
        tiny_backbones["prior_module"].text.state_dict()["transformer.resblocks.0.attn.in_proj_weight"],
        given["transformer.resblocks.0.attn.in_proj_weight"],
    )
    assert all(torch.equal(paper.prior.state_dict()[k], v) for k, v in given.items())


def test_bert_ids_for_prior_feeds_wordpiece_ids_to_clip(paper):
    other = _flipped(paper, bert_ids_for_prior=True)
    base, changed = _run(paper), _run(other)
    assert not torch.allclose(base.aux["prior"], changed.aux["prior"])
    torch.testing.assert_close(base.aux["visual_tokens"], changed.aux["visual_tokens"])
    batch = paper.text.tokenize(TEXTS)
    tower = paper.prior
    with torch.no_grad():
        x, causal = tower.embed(TokenBatch(ids=batch.ids, mask=batch.mask))
        for block in tower.blocks:
            x = tower.run_block(block, x, causal)
        expected = tower.ln_final(x) @ tower.text_projection
    torch.testing.assert_close(changed.aux["prior"], expected)


def test_fixed_prior_mask_allows_only_20_tokens(tiny_backbones):
    backbones = {k: v for k, v in tiny_backbones.items() if k != "text_module"}
    with pytest.raises(ConfigError, match="fixed at 20 x 20.*RefCOCOg"):
        _tiny(backbones, max_len=24, fidelity="release")
    model = _tiny(backbones, max_len=24)  # the paper's prior runs at any length
    assert _run(model).aux["prior"].shape == (2, 24, 128)


def test_fixed_prior_mask_changes_nothing_at_20_tokens(paper):
    torch.testing.assert_close(_run(_flipped(paper, fixed_prior_mask=True)).boxes, _run(paper).boxes)


def test_unmasked_fusion_padding_lets_padding_take_part(paper):
    torch.manual_seed(0)
    tokens = torch.randn(2, paper.head.num_tokens, 128)
    padding = torch.zeros(2, paper.head.num_tokens, dtype=torch.bool)
    padding[:, 10:20] = True
    changed = tokens.clone()
    changed[:, 10:20] += 5.0  # only padded tokens change
    with torch.no_grad():
        masked = [paper.head(t, padding)[0] for t in (tokens, changed)]
        additive = [paper.head(t, padding.float())[0] for t in (tokens, changed)]
        unpadded = paper.head(tokens, torch.zeros_like(padding).float())[0]
        torch.testing.assert_close(unpadded, paper.head(tokens, None)[0])  # nothing padded: the same network
    torch.testing.assert_close(masked[0], masked[1])
    assert not torch.allclose(additive[0], additive[1])
    # in the model: text padding now matters; a batch without text padding is unaffected
    assert not torch.allclose(_run(paper).boxes, _run(_flipped(paper, unmasked_fusion_padding=True)).boxes)
    full = ["the big blue square on the left of the green star and the red circle below the small yellow cross"] * 2
    assert paper.text.tokenize(full).mask.all()
    torch.testing.assert_close(
        _run(paper, texts=full).boxes, _run(_flipped(paper, unmasked_fusion_padding=True), texts=full).boxes
    )


def test_drop_registers(tiny_backbones, reg4):
    backbones = {**tiny_backbones, "visual_module": reg4}
    kept = _tiny(backbones, use_loca=False)
    dropped = _tiny(backbones, use_loca=False, drop_registers=True)
    assert kept.visual.num_prefix_tokens == 5 and dropped.visual.num_prefix_tokens == 1
    assert "visual.reg_token" in kept.state_dict() and "visual.reg_token" not in dropped.state_dict()
    assert reg4.num_prefix_tokens == 5 and reg4.reg_token is not None
    images = _images()
    with torch.no_grad():
        x = reg4.embed(images)
        x = torch.cat([x[:, :1], x[:, 5:]], dim=1)  # the registers taken out of the sequence
        for block in reg4.blocks:
            x = block(x)
        expected = reg4.finish(x)
        torch.testing.assert_close(dropped._visual_tokens(images), expected)
        assert kept._visual_tokens(images).shape == expected.shape  # CLS + grid reach the fusion either way
        assert not torch.allclose(kept._visual_tokens(images), expected)
    with_loca = _tiny(backbones)
    assert with_loca.visual.blocks[1].adapter.num_prefix_tokens == 5
    assert _run(with_loca).boxes.shape == (2, 4)


def test_unused_prior_projection_is_counted_but_never_used(tiny_backbones):
    model = _tiny(tiny_backbones, unused_prior_projection=True)
    base = _run(model).boxes
    with torch.no_grad():
        for layer in model.text.blocks:
            if isinstance(layer, BertLayerWithParallelAdapter):
                layer.adapter.prior_down.weight.normal_()
    torch.testing.assert_close(_run(model).boxes, base)


def test_no_token_type_embedding_leaves_out_only_token_type_zero(paper):
    other = _flipped(paper, no_token_type_embedding=True)
    assert not torch.allclose(_run(paper).boxes, _run(other).boxes)
    both = [copy.deepcopy(paper), copy.deepcopy(other)]
    for model in both:
        model.text.embeddings.token_type_embeddings.weight.data.zero_()
    torch.testing.assert_close(_run(both[0]).boxes, _run(both[1]).boxes)


def test_bert_init_dypa_starts_the_up_projection_off_zero(tiny_backbones, paper):
    model = _tiny(tiny_backbones, bert_init_dypa=True)
    dypa, zero_start = model.text.blocks[3].adapter, paper.text.blocks[3].adapter
    assert torch.equal(zero_start.up.weight, torch.zeros_like(zero_start.up.weight))
    assert 0.015 < dypa.up.weight.std() < 0.025 and 0.015 < dypa.down.weight.std() < 0.025
    assert not dypa.up.bias.any() and not dypa.scale.bias.any()
