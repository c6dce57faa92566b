import argparse
import os

import pytest
import torch

from vgstudy.convert.mapper import (
    from_release,
    load_release,
    read_release_checkpoint,
    release_overrides,
    to_release,
)
from vgstudy.errors import CheckpointError
from vgstudy.models import build
from vgstudy.models.backbones import build_backbone

TEXTS = ["the red circle", "the big blue square on the left of the green star"]
# The release's key names, from its code (models/adapter.py, models/dapt.py, models/clip/model.py, mapper_vg.py).
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
RELEASE_LOCA = [
    *(f"D_fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")),
    *(f"{branch}.conv.{p}" for branch in ("branch1", "branch2.0", "branch2.1") for p in ("weight", "bias")),
    *(f"{branch}.bn.{p}" for branch in ("branch1", "branch2.0", "branch2.1") for p in _BN),
]
RELEASE_DYPA = [
    f"{module}.{p}"
    for module in (
        "bert_adapter_layer_norm_before",
        "clip_adapter_layer_norm_before",
        "clip_down_proj",
        "scale",
        "bert_down_proj",
        "up_proj",
    )
    for p in ("weight", "bias")
]
RELEASE_CLIP_BLOCK = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]
RELEASE_FUSION_LAYER = [
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    *(f"{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2") for p in ("weight", "bias")),
]


def _args(**changes):
    fields = {
        "max_query_len": 20,
        "imsize": 128,
        "vl_hidden_dim": 128,
        "vl_enc_layers": 3,
        "vl_nheads": 4,
        "vl_dim_feedforward": 512,
        "vl_dropout": 0.1,
        "lr": 1e-4,
        "dataset": "unc",
    }
    return argparse.Namespace(**{**fields, **changes})


@pytest.fixture(scope="module")
def tiny_backbones():
    torch.manual_seed(0)
    return {
        "visual_module": build_backbone("dinov2:tiny"),
        "text_module": build_backbone("bert:minilm", max_len=20),
        "prior_module": build_backbone("clip:tiny", max_len=20),
    }


def _tiny(backbones, seed, **overrides):
    torch.manual_seed(seed)
    model = build("mapper-tiny", **{**backbones, **overrides}).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so loading them is tested
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def trained(tiny_backbones):
    """A release-fidelity model standing for a trained one."""
    return _tiny(tiny_backbones, seed=0, fidelity="release")


def _release_only(model):
    """The weights a release checkpoint holds that MaPPER never reads, with the release's shapes at this size."""
    text, clip_visual = model.text, build_backbone("clip:tiny").visual
    extra = {
        "visumodel.mask_token": torch.randn(1, model.visual.width),
        "textmodel.bert.embeddings.position_ids": torch.arange(512).unsqueeze(0),
        "textmodel_clip.clip.logit_scale": torch.tensor(4.6),
    }
    for i in range(text.depth):
        for key, value in text.blocks[i].attention.state_dict().items():
            extra[f"textmodel.bert.encoder.layer.{i}.crossattention.{key}"] = torch.randn_like(value)
    for key, value in clip_visual.state_dict().items():
        extra[f"textmodel_clip.clip.visual.{key}"] = value
    return extra


def _outputs(model):
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(images, TEXTS).boxes


def test_the_release_key_layout(trained):
    release = to_release(trained)
    backbone = {key for key in release if key.startswith("visumodel.") and ".adapter." not in key}
    assert backbone == {f"visumodel.{key}" for key in trained.visual.state_dict() if ".adapter." not in key}
    assert {key.split(".adapter.")[1] for key in release if ".adapter." in key} == set(RELEASE_LOCA)
    assert {key.split(".adapter.")[0] for key in release if ".adapter." in key} == {
        f"visumodel.blocks.{i}" for i in (1, 3, 5)
    }
    dypa = {key for key in release if ".dapt_text." in key}
    assert dypa == {f"textmodel.bert.encoder.layer.{i}.dapt_text.{name}" for i in (1, 3, 5) for name in RELEASE_DYPA}
    assert not any("token_type" in key or "pooler" in key for key in release)  # BLIP's med BERT has neither
    clip = {key.removeprefix("textmodel_clip.clip.") for key in release if key.startswith("textmodel_clip.")}
    blocks = {f"transformer.resblocks.resblock_{i}.{name}" for i in range(6) for name in RELEASE_CLIP_BLOCK}
    embeddings = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    assert clip == blocks | embeddings | {"text_projection"}
    rest = {key for key in release if not key.startswith(("visumodel.", "textmodel.", "textmodel_clip."))}
    assert rest == {
        "text_adapter.down.weight",
        "text_adapter.down.bias",
        "visu_proj.weight",
        "visu_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
        "reg_token.weight",
        "vl_pos_embed.weight",
        *(f"vl_transformer.encoder.layers.{i}.{name}" for i in range(3) for name in RELEASE_FUSION_LAYER),
        *(f"bbox_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")),
    }


def test_a_release_checkpoint_file_round_trips_to_identical_outputs(tmp_path, trained):
    path = tmp_path / "best_checkpoint.pth"
    state = {**to_release(trained), **_release_only(trained)}
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 89, "args": _args(), "val_accu": 0.8}, path)
    state, args = read_release_checkpoint(path)
    assert args.max_query_len == 20
    torch.manual_seed(7)
    fresh = build("mapper-tiny", **release_overrides(args)).eval()  # backbones by name: every weight from the file
    assert not torch.equal(_outputs(fresh), _outputs(trained))
    load_release(fresh, state)
    torch.testing.assert_close(_outputs(fresh), _outputs(trained), rtol=0, atol=0)


def test_registers_dropped_from_reg4_weights_fold_the_cls_position(tiny_backbones):
    backbones = {**tiny_backbones, "visual_module": build_backbone("dinov2:tiny-reg4")}
    trained = _tiny(backbones, seed=0, fidelity="release")
    release = to_release(trained)
    assert release["visumodel.pos_embed"].shape == (1, 1 + 64, 192)  # the release's ViT keeps a CLS position
    release["visumodel.pos_embed"][:, 0] += 1.0  # as in a release file: CLS + its position is what counts
    release["visumodel.cls_token"] -= 1.0
    fresh = load_release(_tiny(backbones, seed=3, fidelity="release"), release)
    torch.testing.assert_close(_outputs(fresh), _outputs(trained))  # (cls - 1) + (pos + 1): rounding only
    kept = _tiny(backbones, seed=3, fidelity="release", drop_registers=False)
    with pytest.raises(CheckpointError, match="visumodel.reg_token"):
        load_release(kept, release)


def test_a_missing_key_is_named(trained):
    state = to_release(trained)
    del state["text_adapter.down.weight"]
    with pytest.raises(CheckpointError, match=r"1 release keys missing.*text_adapter\.down\.weight \(for pgt\.proj"):
        from_release(state, trained)


def test_unexpected_and_mis_shaped_keys_are_named(tiny_backbones, trained):
    without_loca = _tiny(tiny_backbones, seed=0, fidelity="release", use_loca=False)
    with pytest.raises(CheckpointError, match=r"no place: visumodel\.blocks\.1\.adapter\.D_fc1\.weight"):
        from_release(to_release(trained), without_loca)
    state = to_release(trained)
    state["vl_pos_embed.weight"] = torch.zeros(90, 128)
    with pytest.raises(CheckpointError, match=r"head\.pos_embed\.weight \(checkpoint \(90, 128\), model \(86, 128\)"):
        load_release(_tiny(tiny_backbones, seed=1, fidelity="release"), state)


def test_a_model_with_token_types_cannot_take_release_weights(tiny_backbones, trained):
    with pytest.raises(CheckpointError, match="no_token_type_embedding=True"):
        from_release(to_release(trained), _tiny(tiny_backbones, seed=0))


def test_pretrained_prior_blocks_are_kept_and_the_unused_projection_dropped(tiny_backbones, trained):
    model = _tiny(
        tiny_backbones,
        seed=2,
        no_token_type_embedding=True,
        bert_ids_for_prior=True,
        unmasked_fusion_padding=True,
    )  # pretrained prior blocks, no unused projection
    blocks = {k: v.clone() for k, v in model.prior.state_dict().items() if "resblocks" in k}
    load_release(model, {**to_release(trained), **_release_only(trained)})
    assert all(torch.equal(model.prior.state_dict()[k], v) for k, v in blocks.items())
    torch.testing.assert_close(model.pgt.proj.weight, trained.pgt.proj.weight)
    assert model.prior.token_embedding.weight.data_ptr() != trained.prior.token_embedding.weight.data_ptr()


def test_reading_refuses_code_and_missing_files(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        read_release_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_release_checkpoint(tmp_path / "none.pth")


def test_release_overrides():
    assert release_overrides(None) == {"fidelity": "release"}
    overrides = release_overrides(_args(max_query_len=40, imsize=518, vl_hidden_dim=256))
    assert overrides["max_len"] == 40 and overrides["fixed_prior_mask"] is False  # RefCOCOg ran with the mask at 40
    assert overrides["image_size"] == 518 and overrides["dim"] == 256
    assert "fixed_prior_mask" not in release_overrides(_args())


def test_full_size_release_shapes():
    with torch.device("meta"):
        visual, text = build_backbone("dinov2:vit_base_patch14_dinov2"), build_backbone("bert:base")
    prior = build_backbone("clip:ViT-B-16-quickgelu", max_len=20)
    model = build("mapper-b", fidelity="release", visual_module=visual, text_module=text, prior_module=prior)
    shapes = {key: tuple(value.shape) for key, value in to_release(model).items()}
    assert shapes["visumodel.pos_embed"] == (1, 1370, 768)
    assert shapes["visumodel.blocks.3.adapter.D_fc1.weight"] == (288, 768)
    assert shapes["visumodel.blocks.11.adapter.branch2.1.conv.weight"] == (96, 24, 3, 3)
    assert shapes["textmodel.bert.encoder.layer.7.dapt_text.scale.weight"] == (1, 512)
    assert shapes["textmodel.bert.encoder.layer.7.dapt_text.clip_down_proj.weight"] == (32, 512)
    assert shapes["textmodel_clip.clip.transformer.resblocks.resblock_11.attn.in_proj_weight"] == (1536, 512)
    assert shapes["textmodel_clip.clip.positional_embedding"] == (77, 512)
    assert shapes["text_adapter.down.weight"] == (768, 1280)
    assert shapes["vl_pos_embed.weight"] == (1391, 256)
    assert shapes["vl_transformer.encoder.layers.5.linear1.weight"] == (2048, 256)
