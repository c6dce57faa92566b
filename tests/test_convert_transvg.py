"""vgstudy.convert.transvg: the release's key layout, round trips, the errors, safe reading and the release's args.

The release is not needed: its layout is written out below from its code (models/trans_vg.py, DETR's backbone.py and
transformer.py, pytorch_pretrained_bert's BertModel), and a release state dict is made from a model by `to_release`.
"""

import argparse
import pickle

import pytest
import torch

from vgstudy.convert.transvg import (
    from_release,
    load_release,
    read_release_checkpoint,
    release_overrides,
    to_release,
)
from vgstudy.data.tokenizers import build_tokenizer
from vgstudy.errors import CheckpointError, ConfigError
from vgstudy.models.backbones import BertTextTower
from vgstudy.models.transvg import TransVG

TEXTS = ["the red circle", "the big blue square on the left of the green star"]
# The release's top-level modules (models/trans_vg.py) and the parts of one layer in its DETR / fusion encoders.
RELEASE_MODULES = {"visumodel", "textmodel", "vl_pos_embed", "reg_token", "visu_proj", "text_proj", "vl_transformer",
                   "bbox_embed"}  # fmt: skip
RELEASE_ENCODER_LAYER = {
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    *(f"{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2") for p in ("weight", "bias")),
}
RELEASE_BERT_LAYER = {
    *(f"attention.self.{m}.{p}" for m in ("query", "key", "value") for p in ("weight", "bias")),
    *(f"{m}.{p}" for m in ("attention.output.dense", "attention.output.LayerNorm") for p in ("weight", "bias")),
    *(f"{m}.{p}" for m in ("intermediate.dense", "output.dense", "output.LayerNorm") for p in ("weight", "bias")),
}
FROZEN_BN = ("weight", "bias", "running_mean", "running_var")  # DETR's FrozenBatchNorm2d: buffers, no counter


def _small(seed: int) -> TransVG:
    """A TransVG with the release's structure at small widths: ResNet-50 + 1 DETR layer at 64 px, a 2-layer BERT."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    text = BertTextTower(bert, build_tokenizer("bert", 20), 20)
    model = TransVG(
        "resnet50+detr",
        text_module=text,
        image_size=64,
        visual_options={"width": 32, "depth": 1, "heads": 2, "ffn_dim": 64},
        dim=32,
        depth=2,
        heads=2,
        ffn_dim=64,
    ).eval()
    generator = torch.Generator().manual_seed(seed)
    for module in model.visual.body.modules():  # non-trivial frozen statistics, so that loading them is tested
        if hasattr(module, "running_var"):
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


@pytest.fixture(scope="module")
def trained():
    return _small(seed=0)


def _outputs(model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[0, :, 40:] = False
    with torch.no_grad():
        return model(images, TEXTS, valid=valid).boxes


def _args(**changes):
    """The release's train.py arguments of its RefCOCO run (train.sh), the ones that shape the model."""
    fields = {
        "backbone": "resnet50",
        "dilation": False,
        "position_embedding": "sine",
        "enc_layers": 6,
        "dec_layers": 0,
        "dim_feedforward": 2048,
        "hidden_dim": 256,
        "dropout": 0.1,
        "nheads": 8,
        "pre_norm": False,
        "imsize": 640,
        "bert_enc_num": 12,
        "detr_enc_num": 6,
        "vl_dropout": 0.1,
        "vl_nheads": 8,
        "vl_hidden_dim": 256,
        "vl_dim_feedforward": 2048,
        "vl_enc_layers": 6,
        "max_query_len": 20,
        "dataset": "unc",
    }
    return argparse.Namespace(**{**fields, **changes})


def test_the_release_key_layout(trained):
    release = to_release(trained)
    assert {key.split(".")[0] for key in release} == RELEASE_MODULES
    body = {key.removeprefix("visumodel.backbone.0.body.") for key in release if ".body." in key}
    assert {f"bn1.{p}" for p in FROZEN_BN} | {"conv1.weight", "layer4.2.conv3.weight"} <= body
    assert {f"layer1.0.downsample.1.{p}" for p in FROZEN_BN} <= body
    assert not any(key.startswith(("fc.", "avgpool")) or "num_batches_tracked" in key for key in body)
    detr = {key.removeprefix("visumodel.transformer.encoder.layers.0.") for key in release if ".transformer." in key}
    assert detr == RELEASE_ENCODER_LAYER
    assert {"visumodel.input_proj.weight", "visumodel.input_proj.bias"} <= set(release)
    bert = {key.removeprefix("textmodel.bert.") for key in release if key.startswith("textmodel.")}
    embeddings = {f"embeddings.{m}.weight" for m in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    embeddings |= {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
    layers = {f"encoder.layer.{i}.{name}" for i in range(2) for name in RELEASE_BERT_LAYER}
    assert bert == embeddings | layers | {"pooler.dense.weight", "pooler.dense.bias"}
    fusion = {key.removeprefix("vl_transformer.encoder.layers.") for key in release if key.startswith("vl_")}
    assert fusion - {"vl_pos_embed.weight"} == {f"{i}.{name}" for i in range(2) for name in RELEASE_ENCODER_LAYER}
    assert release["vl_pos_embed.weight"].shape == (1 + 20 + 4, 32)  # [REG] + text + 2 x 2 cells at 64 px
    assert {key for key in release if key.startswith("bbox_embed.")} == {
        f"bbox_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")
    }


def test_a_release_checkpoint_file_round_trips_to_identical_outputs(tmp_path, trained):
    path = tmp_path / "best_checkpoint.pth"
    state = {f"module.{key}": value for key, value in to_release(trained).items()}  # as saved under DDP
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 89, "args": _args(imsize=64)}, path)
    state, args = read_release_checkpoint(path)
    assert args["imsize"] == 64 and args["backbone"] == "resnet50"
    fresh = _small(seed=7)
    assert not torch.equal(_outputs(fresh), _outputs(trained))
    assert load_release(fresh, state) is fresh
    torch.testing.assert_close(_outputs(fresh), _outputs(trained), rtol=0, atol=0)
    ours = trained.state_dict()
    assert all(torch.equal(value, ours[key]) for key, value in fresh.state_dict().items())


def test_every_problem_is_listed_in_one_error(trained):
    state = to_release(trained)
    del state["textmodel.bert.pooler.dense.bias"]
    state["vl_transformer.encoder.norm.weight"] = torch.ones(32)  # a pre-norm fusion's final norm
    state["vl_pos_embed.weight"] = torch.zeros(421, 32)  # 640 px: 20 x 20 cells
    with pytest.raises(CheckpointError) as caught:
        from_release(state, trained)
    message = str(caught.value)
    assert "1 release keys that map to no key of the model: vl_transformer.encoder.norm.weight" in message
    assert (
        "1 model keys the release checkpoint does not provide: textmodel.bert.pooler.dense.bias (for text." in message
    )
    assert "vl_pos_embed.weight (release (421, 32), model (25, 32))" in message


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"model": {}, "args": Payload()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_release_checkpoint(path)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="expected a dict with a state dict under 'model'"):
        read_release_checkpoint(tmp_path / "other.pth")


def test_the_releases_arguments_become_overrides():
    overrides = release_overrides(vars(_args(max_query_len=40, backbone="resnet101")))
    assert overrides == {
        "visual": "resnet101+detr",
        "text": "bert:base",
        "max_len": 40,
        "image_size": 640,
        "dim": 256,
        "depth": 6,
        "heads": 8,
        "ffn_dim": 2048,
        "dropout": 0.1,
        "visual_options": {"width": 256, "depth": 6, "heads": 8, "ffn_dim": 2048, "dropout": 0.1, "dilation": False},
    }
    for change, message in (
        ({"bert_enc_num": 6}, r"bert_enc_num=6: expected 12 \(vgstudy reads BERT's last layer\)"),
        ({"pre_norm": True}, r"pre_norm=True: expected False"),
        ({"position_embedding": "learned"}, r"position_embedding='learned'"),
        ({"backbone": "resnet18"}, r"backbone='resnet18': expected resnet50 or resnet101"),
    ):
        with pytest.raises(ConfigError, match=message):
            release_overrides(vars(_args(**change)))
