import pytest
import torch

from vgstudy.errors import ConfigError
from vgstudy.models import build, model_names
from vgstudy.models.backbones import build_backbone
from vgstudy.models.mapper import LR_SCALE
from vgstudy.models.petl import PETL_METHODS, BottleneckAdapter, LinearWithAdapter, PETLConfig, build_petl
from vgstudy.train import Stage, parameter_groups

TEXTS = ["the red circle", "the big blue square on the left of the green star"]


@pytest.fixture(scope="module")
def tiny_backbones():
    torch.manual_seed(0)
    return {"visual_module": build_backbone("dinov2:tiny"), "text_module": build_backbone("bert:minilm", max_len=20)}


@pytest.fixture(scope="module")
def models(tiny_backbones):
    """Every tiny baseline built with the same seed: the same fusion and head, the methods added after them."""
    built = {}
    for method in PETL_METHODS:
        torch.manual_seed(0)
        built[method] = build_petl(method, "tiny", **tiny_backbones).eval()
    return built


def _images(batch=2):
    return torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def test_registered_names():
    names = set(model_names())
    assert {f"petl-{m}-{s}" for m in PETL_METHODS for s in ("tiny", "b")} <= names


def test_tiny_counts(models):
    counts = {method: model.tunable_count() for method, model in models.items()}
    # two bottlenecks of 8 per block, 6 blocks of 192 (DINOv2-tiny) and 6 layers of 384 (MiniLM)
    assert counts["adapter"].modules == {"visual": 12 * (2 * 192 * 8 + 8 + 192), "text": 12 * (2 * 384 * 8 + 8 + 384)}
    assert counts["lora"].modules == {"visual": 6 * 8 * (192 + 3 * 192), "text": 6 * 2 * 8 * (384 + 384)}
    assert counts["adaptformer"].modules == {
        "visual": 6 * (2 * 192 * 16 + 16 + 192),
        "text": 6 * (2 * 384 * 16 + 16 + 384),
    }
    assert counts["full"].tunable == counts["full"].backbone == 25_545_408
    assert not any(name.startswith("prior") for name, _ in models["full"].named_parameters())


@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):  # shapes only: counting needs no values
        return {
            "visual_module": build_backbone("dinov2:vit_base_patch14_dinov2"),
            "text_module": build_backbone("bert:base"),
        }


def test_full_size_counts_are_near_mappers_budget(full_size):
    counts = {method: build_petl(method, "b", **full_size).tunable_count() for method in PETL_METHODS}
    assert counts["adapter"].tunable == 24 * 2 * (2 * 768 * 32 + 32 + 768) == 2_397_696
    assert counts["lora"].tunable == 12 * 32 * (768 + 3 * 768) + 12 * 2 * 32 * (768 + 768) == 2_359_296
    assert counts["adaptformer"].tunable == 24 * (2 * 768 * 64 + 64 + 768) == 2_379_264
    assert counts["full"].tunable == counts["full"].backbone == 196_061_952
    assert f"{100 * counts['lora'].share:.2f}%" == "1.20%"


def test_every_method_starts_as_the_frozen_model(models):
    """Adapters start with a zero up-projection and LoRA with a zero B: at initialisation each baseline computes
    exactly what the backbones without it compute (the "full" model, same seed, has no module added)."""
    images = _images()
    with torch.no_grad():
        reference = models["full"](images, TEXTS).boxes
        for method in ("adapter", "lora", "adaptformer"):
            torch.testing.assert_close(models[method](images, TEXTS).boxes, reference)


@pytest.mark.parametrize("method", ["adapter", "lora", "adaptformer"])
def test_only_the_method_and_the_head_train(tiny_backbones, method):
    torch.manual_seed(0)
    model = build_petl(method, "tiny", **tiny_backbones).train()
    model(_images(), TEXTS).boxes.sum().backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    backbone = [name for name in trainable if name.startswith(("visual.", "text."))]
    marker = {"adapter": ".adapter.", "lora": ".lora_", "adaptformer": ".adapter."}[method]
    assert backbone and all(marker in name for name in backbone)
    assert all(p.grad is not None for _, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for _, p in model.named_parameters() if not p.requires_grad)
    groups = parameter_groups(model, Stage(name="main", epochs=1, lr=1e-4, lr_scale=LR_SCALE), weight_decay=0.0)
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    by_name = dict(model.named_parameters())
    assert all(rate[id(by_name[name])] == pytest.approx(1e-5) for name in backbone)
    assert rate[id(model.head.pos_embed.weight)] == pytest.approx(1e-4)


def test_full_fine_tuning_trains_the_backbones(models):
    model = models["full"]
    assert all(p.requires_grad for p in model.visual.parameters()) and all(
        p.requires_grad for p in model.text.parameters()
    )


def test_sequential_adapter_keeps_the_linear_and_its_names():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    adapted = LinearWithAdapter(linear, BottleneckAdapter(4, 2))
    x = torch.randn(3, 6)
    torch.testing.assert_close(adapted(x), linear(x))
    assert set(adapted.state_dict()) == {
        "weight",
        "bias",
        "adapter.down.weight",
        "adapter.down.bias",
        "adapter.up.weight",
        "adapter.up.bias",
    }
    torch.nn.init.normal_(adapted.adapter.up.weight)
    y = linear(x)
    torch.testing.assert_close(adapted(x), y + adapted.adapter(y))


def test_overrides(tiny_backbones):
    model = build("petl-adaptformer-tiny", bottleneck=4, adaptformer_scale=0.5, **tiny_backbones)
    assert model.petl == PETLConfig("adaptformer", bottleneck=4, adaptformer_scale=0.5)
    assert model.visual.blocks[0].scale == 0.5 and model.visual.blocks[0].adapter.down.out_features == 4
    lora = build("petl-lora-tiny", lora_rank=2, **tiny_backbones)
    assert lora.petl.lora_alpha == 2.0  # alpha follows the rank unless given
    with pytest.raises(ConfigError, match="use_loca"):
        build("petl-adapter-tiny", use_loca=True, **tiny_backbones)
    with pytest.raises(ConfigError, match="method='prefix'"):
        PETLConfig("prefix")
    with pytest.raises(ConfigError, match="bottleneck"):
        PETLConfig("adapter", bottleneck=0)
