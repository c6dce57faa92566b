"""Released HiVG checkpoints: the release's exact key layout, strict conversion, and identical outputs after it.

The release's state dicts are fabricated at tiny scale the way the release builds its model (models/HiVG.py): a
transformers `CLIPModel` (here from a tiny CLIPConfig with clip:tiny's shapes) whose bridged vision layers get
`cross_norm`, `cross_attn` (HF's attention layout), `cross_mlp`, `cross_gate` and `cross_adaptive_weights`, wrapped by
peft with the release's LoraConfig, next to the head's modules under the release's names and shapes.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from vgstudy.convert.hivg import (
    from_release,
    load_release,
    read_release_checkpoint,
    release_overrides,
    to_release,
)
from vgstudy.errors import CheckpointError, ConfigError
from vgstudy.models import build
from vgstudy.models.hivg import HiVG

SIZE = 32  # clip:tiny at 32 px: 2 x 2 patches of 16 px
BRIDGES = (0, 1, 3, 5)  # hivg-tiny's, mapped from ViT-B's 0, 3, 7, 11
TEXTS = ["the red circle", "the big blue square on the left of the green star"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors on 2 shared cores: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def release_model(seed: int = 0) -> nn.Module:
    """The release's HiVG (--dataset unc: one text level) at clip:tiny's scale, LoRA wrapped once, LoRA B random."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 6,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "vocab_size": 49408,
            "hidden_act": "gelu",
            "eos_token_id": 2,  # HF's legacy pooling: the argmax token, CLIP's end of text
        },
        vision_config={
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 6,
            "num_attention_heads": 3,
            "image_size": SIZE,
            "patch_size": 16,
            "hidden_act": "gelu",
        },
        projection_dim=128,
    )
    clip = CLIPModel(config)
    vision, text = config.vision_config, config.text_config
    for i in BRIDGES:  # CLIPEncoderLayer_with_Crossmodal_Bridge
        layer = clip.vision_model.encoder.layers[i]
        layer.cross_norm = nn.LayerNorm(vision.hidden_size)
        layer.cross_attn = CLIPAttention(vision)
        layer.cross_mlp = CLIPMLP(vision)
        layer.cross_gate = nn.Linear(text.hidden_size * 1, vision.hidden_size)
        layer.cross_adaptive_weights = nn.ModuleList([nn.Embedding(32, text.hidden_size)])
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "wte"]  # set_HiLoRA's list
    lora = LoraConfig(target_modules=targets, inference_mode=False, r=32, lora_alpha=16, lora_dropout=0.1, bias="none")
    release = nn.Module()
    release.clip = get_peft_model(clip, lora)
    with torch.no_grad():
        for name, parameter in release.clip.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    hidden, visual_tokens, text_tokens = 128, (SIZE // 16) ** 2, 32
    release.visu_proj = nn.Linear(hidden, hidden)
    release.condition_text_proj = nn.Linear(hidden, vision.hidden_size)
    release.ml_text_feat_perceiver = nn.Linear(text.hidden_size * 1, vision.hidden_size)
    release.text_proj = nn.Linear(hidden, hidden)
    release.reg_token = nn.Embedding(1, hidden)
    release.vl_pos_embed = nn.Embedding(visual_tokens + 1 + text_tokens + 1, hidden)
    release.vl_transformer = nn.Module()
    release.vl_transformer.encoder = nn.Module()
    release.vl_transformer.encoder.layers = nn.ModuleList(nn.TransformerEncoderLayer(hidden, 4, 512) for _ in range(3))
    release.vl_transformer.encoder.norm = nn.LayerNorm(hidden)
    release.bbox_embed = nn.Module()
    release.bbox_embed.layers = nn.ModuleList(
        [nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)]
    )
    release.reg_pos_embed = nn.Embedding(1, hidden)
    release.condition_text_pos_embed = nn.Embedding(text_tokens, vision.hidden_size)
    release.ml_visual_projection = nn.Linear(4 * vision.hidden_size, hidden)
    release.visu_token_norm = nn.LayerNorm(hidden)
    release.visu_token_mlp = nn.Module()
    release.visu_token_mlp.fc1, release.visu_token_mlp.fc2 = nn.Linear(hidden, 512), nn.Linear(512, hidden)
    for k in (1, 2, 3):
        setattr(release, f"seg_conv{k}", nn.ConvTranspose2d(hidden, hidden, 2, stride=2, bias=False))
    return release.eval()


def release_state_dict(release: nn.Module, wraps: int, peft_scheme: str = "base_layer") -> dict[str, torch.Tensor]:
    """The release's saved "model": `get_peft_model` applied `wraps` times (stage + 1) adds `base_model.model.` after
    `clip.` each time; peft < 0.7 has no `base_layer`; transformers 4.30 saves the position-id buffers."""
    state = {}
    for key, value in release.state_dict().items():
        if peft_scheme == "plain":
            key = key.replace(".base_layer.", ".")
        state[key.replace("clip.base_model.model.", "clip." + "base_model.model." * wraps)] = value
    wrap = "clip." + "base_model.model." * wraps
    state[wrap + "text_model.embeddings.position_ids"] = torch.arange(32)[None]
    state[wrap + "vision_model.embeddings.position_ids"] = torch.arange(1 + (SIZE // 16) ** 2)[None]
    return state


def hivg(seed: int = 0, stage: str = "stage3", **overrides) -> HiVG:
    torch.manual_seed(seed)
    options = {"image_size": SIZE, "text_layout": "official", "hilora_merge": False, **overrides}
    model = build("hivg-tiny", **options).eval()
    model.enter_stage(stage)
    return model


@pytest.fixture(scope="module")
def release():
    return release_model()


@pytest.fixture(scope="module")
def model():
    return hivg()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("peft_scheme", ["base_layer", "plain"])
def test_to_release_writes_exactly_the_releases_keys_and_shapes(release, model, peft_scheme):
    expected = release_state_dict(release, wraps=4, peft_scheme=peft_scheme)
    written = to_release(model, wraps=4, peft_scheme=peft_scheme)
    assert sorted(written) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in expected.items()}


@pytest.mark.parametrize(("wraps", "peft_scheme"), [(1, "base_layer"), (4, "plain")])
def test_a_released_checkpoint_gives_hf_clips_own_outputs(release, wraps, peft_scheme):
    model = hivg(seed=1)
    load_release(model, release_state_dict(release, wraps, peft_scheme))
    hf = release.clip.base_model.model  # the CLIPModel with the release's LoRA injected
    batch = model.clip.text.tokenize(TEXTS)
    with torch.no_grad():
        hf_text = hf.text_projection(hf.text_model(input_ids=batch.ids).pooler_output)
        hf_image = hf.visual_projection(hf.vision_model(pixel_values=images()).pooler_output)
        ours_text = model.clip.text(batch).pooled
        ours_image = model.clip.visual.project(model.clip.visual(images()).tokens)
    assert torch.allclose(ours_text, hf_text, atol=1e-5)
    assert torch.allclose(ours_image, hf_image, atol=1e-5)
    with release.clip.disable_adapter(), torch.no_grad():  # the release's LoRA matters: without it CLIP differs
        assert not torch.allclose(ours_text, hf.text_projection(hf.text_model(input_ids=batch.ids).pooler_output))


@pytest.mark.parametrize(
    ("peft_scheme", "merge"), [("base_layer", False), ("plain", False), ("base_layer", True)], ids=str
)
def test_converting_to_the_release_and_back_gives_identical_outputs(peft_scheme, merge):
    original = hivg(seed=2, hilora_merge=merge)
    with torch.no_grad():
        for name, parameter in original.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    converted = hivg(seed=3, hilora_merge=merge)
    load_release(converted, to_release(original, wraps=4, peft_scheme=peft_scheme))
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    expected, got = original(images(), TEXTS), converted(images(), TEXTS)
    assert torch.equal(got.boxes, expected.boxes)
    assert all(torch.equal(got.aux[key], expected.aux[key]) for key in expected.aux)


def test_a_missing_key_is_listed(release, model):
    state = release_state_dict(release, wraps=4)
    del state[
        "clip.base_model.model.base_model.model.base_model.model.base_model.model.text_model.final_layer_norm.bias"
    ]
    with pytest.raises(
        CheckpointError, match=r"1 model keys the release checkpoint does not provide: clip\.text\.ln_final"
    ):
        from_release(state, model)


def test_a_lora_weight_missing_is_listed(release, model):
    state = {
        k: v for k, v in release_state_dict(release, wraps=1).items() if "layers.3.self_attn.q_proj.lora_A" not in k
    }
    with pytest.raises(CheckpointError, match=r"resblocks\.3\.attn\.q_proj\.lora_A\.hilora\.weight"):
        from_release(state, model)


def test_an_unexpected_key_is_listed(release, model):
    state = {**release_state_dict(release, wraps=1), "clip.base_model.model.text_model.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 release keys that map to no key of the model: .*extra\.weight"):
        from_release(state, model)


def test_another_architecture_is_listed_by_shape(release):
    other = hivg(head_ffn_dim=256)  # the release's head has FFN 512 here
    with pytest.raises(CheckpointError, match=r"head\.layers\.0\.linear1\.weight \(release \(512, 128\), model"):
        from_release(release_state_dict(release, wraps=1), other)


def test_mixed_peft_wraps_are_refused(release, model):
    state = release_state_dict(release, wraps=2)
    state["clip.base_model.model.logit_scale"] = state.pop("clip.base_model.model.base_model.model.logit_scale")
    with pytest.raises(CheckpointError, match=r"different numbers of peft wraps \[1, 2\]"):
        from_release(state, model)


def test_a_release_file_is_read_with_its_arguments(tmp_path, release):
    args = argparse.Namespace(model="ViT-B/16", dataset="unc+", hi_lora_stage=2, enable_adaptive_weights=True)
    path = tmp_path / "best_checkpoint.pth"
    torch.save({"model": release_state_dict(release, wraps=3), "args": args, "epoch": 19}, path)
    state, read_args = read_release_checkpoint(path)
    assert len(state) == len(release_state_dict(release, wraps=3)) and read_args["dataset"] == "unc+"
    overrides, stage = release_overrides(read_args)
    assert stage == "stage2"
    assert overrides == {
        "backbone": "clip:ViT-B-16-quickgelu",
        "dataset": "unc+",
        "adaptive_weights": True,
        "text_layout": "official",
        "hilora_merge": False,
    }
    with pytest.raises(ConfigError, match="hi_lora_stage=7"):
        release_overrides({**read_args, "hi_lora_stage": 7})


class Payload:
    """Stands for any object a pickle could bring along (and run code to rebuild)."""


def test_a_release_file_with_other_objects_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {}, "args": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_release_checkpoint(path)
