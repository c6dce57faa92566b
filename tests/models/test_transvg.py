"""TransVG: shapes, parameter counts against the release's, masking, gradients, independence, errors, and training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vgstudy.data.synthref import SynthRef
from vgstudy.data.tokenizers import TokenBatch
from vgstudy.data.transforms import CLIP_MEAN, IMAGENET_MEAN, GroundingTransform, TransformedDataset, collate
from vgstudy.errors import ConfigError, DataError
from vgstudy.losses import BoxCriterion
from vgstudy.models import build, build_backbone, describe, model_names
from vgstudy.models.transvg import LR_SCALE, TransVG
from vgstudy.train import Stage, TrainConfig, Trainer, parameter_groups

TEXTS = ["the red circle", "the second square from the left of the big blue star", "a ring"]


def _build(name: str, seed: int = 0, **overrides) -> TransVG:
    torch.manual_seed(seed)
    return build(name, dropout=0.0, **overrides).eval()


@pytest.fixture(scope="module")
def tiny() -> TransVG:
    return _build("transvg-tiny")


@pytest.fixture(scope="module")
def tiny_clip() -> TransVG:
    return _build("transvg-tiny-clip")


def _images(batch: int, size: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- Shapes and configurations --------------------------------------------------------------------------------------


def test_names_are_registered():
    assert {"transvg-r50", "transvg-r101", "transvg-tiny", "transvg-tiny-clip"} <= set(model_names())


@pytest.mark.parametrize(("fixture", "mean"), [("tiny", IMAGENET_MEAN), ("tiny_clip", CLIP_MEAN)])
def test_tiny_forward_shapes_boxes_and_transform(fixture, mean, request):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        out = model(_images(3), TEXTS)
    assert out.boxes.shape == (3, 4) and ((out.boxes > 0) & (out.boxes < 1)).all()
    # 8 x 8 grid tokens (stride-16 ResNet / 16 px patches, CLIP's CLS left out) and 20 text tokens, projected to 128
    shapes = {key: tuple(value.shape) for key, value in out.aux.items()}
    assert shapes == {
        "reg": (3, 128),
        "visual_tokens": (3, 64, 128),
        "text_tokens": (3, 20, 128),
        "visual_mask": (3, 64),
        "text_mask": (3, 20),
    }
    assert out.aux["visual_mask"].all()  # no `valid`: every visual token is real
    assert out.aux["text_mask"].sum(1).tolist()[0] < out.aux["text_mask"].sum(1).tolist()[1]  # a longer text
    assert model.head.num_tokens == 20 + 64
    assert (model.transform.image_size, model.transform.mean, model.transform.train) == (128, mean, False)


def test_tiny_clip_takes_both_towers_of_one_clip_or_given_modules():
    torch.manual_seed(0)
    clip = build_backbone("clip:tiny", max_len=20)
    model = build("transvg-tiny-clip", visual_module=clip, text_module=clip)
    assert model.visual is clip.visual and model.text is clip.text
    built = describe(_build("transvg-tiny-clip"))
    assert describe(model)["total"] == built["total"]


# --- Parameter counts -------------------------------------------------------------------------------------------------


def _fusion_count(dim: int, depth: int, ffn_dim: int, num_tokens: int) -> int:
    """The release's VL transformer + [REG] + position table + bbox MLP (`models/trans_vg.py`)."""
    layer = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * ffn_dim + ffn_dim) + (ffn_dim * dim + dim) + 4 * dim
    mlp = 2 * (dim * dim + dim) + (dim * 4 + 4)
    return depth * layer + mlp + dim + (num_tokens + 1) * dim


# The release's TransVG-R50 with random weights (bert_enc_num 12, imsize 640, max_query_len 20): ResNet-50 trunk with
# FrozenBatchNorm (buffers) 23,454,912 + input_proj 524,544 + 6 DETR encoder layers 7,890,432; BertModel of
# pytorch_pretrained_bert (all 12 layers and the pooler) 109,482,240; visu_proj 256 -> 256; text_proj 768 -> 256;
# the fusion over 1 + 20 + 400 tokens. Frozen: conv1 and layer1 (222,400), as DETR's BackboneBase does.
RELEASE_R50 = 31_869_888 + 109_482_240 + (256 * 256 + 256) + (768 * 256 + 256) + _fusion_count(256, 6, 2048, 420)


@pytest.mark.parametrize(
    ("name", "total", "trainable", "visual", "visual_trainable"),
    [
        ("transvg-r50", 149_745_860, 149_523_460, 31_869_888, 31_647_488),
        ("transvg-r101", 168_685_764, 168_463_364, 50_809_792, 50_587_392),
    ],
)
def test_full_size_parameter_counts_are_the_releases(name, total, trainable, visual, visual_trainable):
    counts = describe(build(name))
    assert (counts["total"], counts["trainable"]) == (total, trainable)
    assert counts["parts"] == {
        "visual": {"total": visual, "trainable": visual_trainable},
        "text": {"total": 109_482_240, "trainable": 109_482_240},
        "visual_proj": {"total": 65_792, "trainable": 65_792},
        "text_proj": {"total": 196_864, "trainable": 196_864},
        "head": {"total": 8_131_076, "trainable": 8_131_076},
    }
    if name == "transvg-r50":
        assert total == RELEASE_R50


def test_tiny_parameter_counts(tiny, tiny_clip):
    fusion = _fusion_count(128, 3, 512, 84)
    assert describe(tiny)["parts"] == {
        "visual": {"total": 3_410_496, "trainable": 3_410_496},  # ResNet-18 to layer3 + 3 encoder layers
        "text": {"total": 22_713_216, "trainable": 22_713_216},  # MiniLM-L6
        "visual_proj": {"total": 128 * 128 + 128, "trainable": 128 * 128 + 128},
        "text_proj": {"total": 384 * 128 + 128, "trainable": 384 * 128 + 128},
        "head": {"total": fusion, "trainable": fusion},
    }
    assert (describe(tiny)["total"], describe(tiny_clip)["total"]) == (26_828_868, 11_069_828)


def test_freezing_a_backbone_as_the_release_does_for_lr_0():
    model = _build("transvg-tiny", freeze_visual=True, freeze_text=True).train()
    counts = describe(model)
    assert counts["parts"]["visual"]["trainable"] == counts["parts"]["text"]["trainable"] == 0
    assert counts["trainable"] == counts["total"] - 3_410_496 - 22_713_216
    # frozen backbones are fixed feature extractors: eval mode (BatchNorm statistics kept) while the rest trains
    assert not model.visual.training and not model.text.training and model.head.training
    running_mean = model.visual.body.bn1.running_mean.clone()
    model(_images(2), TEXTS[:2]).boxes.sum().backward()
    assert torch.equal(model.visual.body.bn1.running_mean, running_mean)
    assert all(p.grad is None for p in [*model.visual.parameters(), *model.text.parameters()])
    assert model.visual_proj.weight.grad is not None and model.text_proj.weight.grad is not None


def test_release_lr_scale_prefixes_name_the_backbones(tiny):
    groups = parameter_groups(tiny, Stage("train", epochs=1, lr=1e-4, lr_scale=LR_SCALE), weight_decay=1e-4)
    by_lr = {}
    for group in groups:
        by_lr[group["lr"]] = by_lr.get(group["lr"], 0) + sum(p.numel() for p in group["params"])
    backbones = 3_410_496 + 22_713_216
    assert by_lr == pytest.approx({1e-5: backbones, 1e-4: describe(tiny)["total"] - backbones})


# --- Gradients, masking, independence --------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny", "tiny_clip"])
def test_gradients_reach_projections_head_and_backbones(fixture, request):
    model = request.getfixturevalue(fixture)
    model.zero_grad(set_to_none=True)
    try:
        model(_images(2), TEXTS[:2]).boxes.sum().backward()
        parts = [model.visual_proj, model.text_proj, model.head.box_mlp, model.head.layers[0], model.head.pos_embed]
        parts += [model.visual.blocks[0], model.visual.blocks[-1], model.text.blocks[0], model.text.blocks[-1]]
        for part in parts:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
        stem = next(model.visual.parameters())  # the first convolution / the patch embedding
        assert stem.grad is not None and stem.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_clip"])
def test_text_padding_is_masked(fixture, request):
    model = request.getfixturevalue(fixture)
    batch = model.text.tokenizer(TEXTS)
    other_padding = torch.randint(1, 1000, batch.ids.shape, generator=torch.Generator().manual_seed(0))
    changed = TokenBatch(ids=torch.where(batch.mask, batch.ids, other_padding), mask=batch.mask)
    assert not torch.equal(changed.ids, batch.ids)
    with torch.no_grad():
        a = model(_images(3), batch).boxes
        b = model(_images(3), changed).boxes
        c = model(_images(3), TEXTS).boxes
        unmasked = model(_images(3), TokenBatch(ids=changed.ids, mask=torch.ones_like(batch.mask))).boxes
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)  # texts tokenised by the model's own tokenizer
    assert not torch.allclose(a, unmasked, atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_clip"])
def test_samples_in_a_batch_are_independent(fixture, request):
    model = request.getfixturevalue(fixture)
    images = _images(3)
    with torch.no_grad():
        together = model(images, TEXTS).boxes
        alone = torch.cat([model(images[i : i + 1], TEXTS[i : i + 1]).boxes for i in range(3)])
        swapped = model(images[[1, 0, 2]], [TEXTS[1], TEXTS[0], TEXTS[2]]).boxes
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[[1, 0, 2]], swapped, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[1], atol=1e-4)  # the image and text do matter


@pytest.mark.parametrize("fixture", ["tiny", "tiny_clip"])
def test_valid_padding_masks_the_visual_tokens_in_the_head(fixture, request):
    model = request.getfixturevalue(fixture)
    images = _images(2)
    valid = torch.ones(2, 128, 128, dtype=torch.bool)
    valid[0, :, 96:] = False  # image 0: the right quarter is padding -> the last 2 of 8 grid columns
    valid[1, :32] = False  # image 1: the top quarter -> the first 2 grid rows
    expected_mask = torch.ones(2, 8, 8, dtype=torch.bool)
    expected_mask[0, :, 6:] = False
    expected_mask[1, :2] = False

    def disturb_padding(module, inputs, output):  # large changes to the tokens the mask says are padding
        noise = 100 * torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
        return torch.where(expected_mask.flatten(1)[..., None], output, output + noise)

    with torch.no_grad():
        clean = model(images, TEXTS[:2], valid)
        handle = model.visual_proj.register_forward_hook(disturb_padding)
        try:
            disturbed = model(images, TEXTS[:2], valid).boxes
            unmasked = model(images, TEXTS[:2]).boxes
        finally:
            handle.remove()
        without_valid = model(images, TEXTS[:2]).boxes
    assert torch.equal(clean.aux["visual_mask"], expected_mask.flatten(1))
    torch.testing.assert_close(clean.boxes, disturbed, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked, without_valid, atol=1e-3)  # the disturbance matters where not masked
    assert not torch.allclose(clean.boxes, without_valid, atol=1e-5)  # the mask changes the prediction


# --- Errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"visual": "resnet19+detr:tiny"}, "unknown backbone 'resnet19\\+detr:tiny'"),
        ({"text": "bert:minilmm"}, "bert:minilmm"),
        ({"visual": "bert:minilm"}, "visual='bert:minilm' is a BertTextTower; expected a visual backbone"),
        ({"text": "resnet18+detr:tiny"}, "expected a text backbone"),
        ({"visual_module": torch.nn.Linear(2, 2)}, "visual_module is a Linear"),
        ({"visual_options": {"return_layer": "layer2"}}, "return_layer='layer2'"),
    ],
)
def test_bad_configurations_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build("transvg-tiny", **overrides)


def test_given_backbones_exclude_the_options_that_build_them(tiny):
    with pytest.raises(ConfigError, match="expected none of them with visual_module"):
        TransVG(visual_module=tiny.visual, text_module=tiny.text, image_size=256)
    with pytest.raises(ConfigError, match="tokenises to 20 tokens"):
        TransVG(visual_module=tiny.visual, text_module=tiny.text, max_len=40)
    with pytest.raises(ConfigError, match="builds one CLIP"):
        TransVG("clip:tiny", "clip:tiny", text_weights="a.safetensors")


def test_bad_inputs_are_data_errors(tiny):
    with pytest.raises(DataError, match=r"expected \(B, 3, 128, 128\)"):
        tiny(_images(1, size=96), TEXTS[:1])
    with pytest.raises(DataError, match="expected a list of 2 strings"):
        tiny(_images(2), TEXTS[:1])
    with pytest.raises(DataError, match=r"valid of shape \(2, 64, 64\)"):
        tiny(_images(2), TEXTS[:2], torch.ones(2, 64, 64, dtype=torch.bool))
    with pytest.raises(DataError, match="empty"):
        tiny(_images(1), ["  "])


# --- Training ---------------------------------------------------------------------------------------------------------


def test_a_short_training_on_synthref_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = build("transvg-tiny", dropout=0.0, freeze_text=True)  # the text tower's backward is half the cost
    # 64 samples without augmentation, 4 steps per epoch: the loss of the last epoch against that of the first
    train_set = TransformedDataset(SynthRef("train", 64, seed=0), GroundingTransform(model.transform))
    stage = Stage("train", epochs=3, lr=1e-3, schedule="constant")
    config = TrainConfig(stages=(stage,), batch_size=16, eval_every_epochs=0, log_every_steps=4)
    Trainer(model, BoxCriterion(), train_set, config, tmp_path, collate_fn=collate).fit(resume=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["kind"] == "train"]
    assert len(losses) == 3 and losses[-1] < 0.9 * losses[0]


def test_the_train_transform_is_the_releases_with_flips(tiny):
    train = dataclasses.replace(tiny.transform, train=True)
    assert train.flip_prob == 0.5 and train.train
