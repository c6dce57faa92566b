import dataclasses
import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score

from vgstudy import zoo
from vgstudy.errors import CheckpointError, ConfigError
from vgstudy.models.backbones import CLIPBackbone, DINOv2VisionTower, ResNetDETREncoder
from vgstudy.zoo import ZOO, PretrainSpec, cache_path, mean_average_precision, pretrain, pretrained, report

# Reduced runs: 64 px scenes (4 x 4 tokens for the ViTs, 2 x 2 for ResNet-18) and few steps.
TINY_VISION = PretrainSpec(
    backbone="dinov2:tiny",
    objective="multilabel",
    steps=2,
    batch_size=4,
    lr=1e-3,
    weight_decay=0.05,
    warmup_steps=1,
    n_scenes=8,
    image_size=64,
    n_val_scenes=4,
    log_every=1,
)


def _equal_state_dicts(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.fixture
def counted_pretrain(monkeypatch):
    """Counts the trainings `pretrained` starts."""
    calls = []

    def counting(spec, **kwargs):
        calls.append(spec)
        return pretrain(spec, **kwargs)

    monkeypatch.setattr(zoo, "pretrain", counting)
    return calls


# --- Specs and names ------------------------------------------------------------------------------------------------


def test_zoo_has_the_three_models_with_tiny_and_study_profiles():
    assert set(ZOO) == {"clip-tiny", "vit-tiny", "resnet-tiny"}
    backbones = {"clip-tiny": "clip:tiny", "vit-tiny": "dinov2:tiny", "resnet-tiny": "resnet18+detr:tiny"}
    for name, profiles in ZOO.items():
        assert set(profiles) == {"tiny", "study"}
        assert {spec.backbone for spec in profiles.values()} == {backbones[name]}
        assert profiles["study"].steps >= 5 * profiles["tiny"].steps
    assert ZOO["clip-tiny"]["tiny"].objective == "contrastive"
    assert ZOO["vit-tiny"]["tiny"].objective == ZOO["resnet-tiny"]["tiny"].objective == "multilabel"


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"objective": "masked"}, "objective"),
        ({"objective": "contrastive"}, "contrastive"),  # a vision backbone has no text tower
        ({"steps": 0}, "steps"),
        ({"batch_size": 1}, "batch_size"),
        ({"batch_size": 16}, "n_scenes"),
        ({"lr": 0.0}, "lr"),
        ({"lr": "1e-3"}, "lr"),  # YAML reads 1e-3 as a string
        ({"warmup_steps": 3}, "warmup_steps"),
        ({"steps": True}, "steps"),
        ({"region_weight": float("nan")}, "region_weight"),
    ],
)
def test_a_bad_spec_is_a_config_error_naming_the_field(changes, word):
    with pytest.raises(ConfigError, match=word):
        dataclasses.replace(TINY_VISION, **changes)


def test_the_spec_hash_changes_with_every_field():
    hashes = {TINY_VISION.hash()}
    for changes in ({"seed": 1}, {"steps": 1}, {"lr": 2e-3}, {"dense_weight": 0.5}, {"image_size": 128}):
        hashes.add(dataclasses.replace(TINY_VISION, **changes).hash())
    assert len(hashes) == 6
    assert TINY_VISION.hash() == dataclasses.replace(TINY_VISION).hash()


def test_cache_path_names_model_profile_and_spec_hash(tmp_path, monkeypatch):
    spec = ZOO["vit-tiny"]["study"]
    assert cache_path("vit-tiny", "study", tmp_path) == tmp_path / f"vit-tiny-study-{spec.hash()[:10]}"
    monkeypatch.setenv("VGSTUDY_CACHE", str(tmp_path / "elsewhere"))
    assert cache_path("vit-tiny").parent == tmp_path / "elsewhere"
    monkeypatch.delenv("VGSTUDY_CACHE")
    assert cache_path("vit-tiny").parent == Path(zoo.__file__).resolve().parent.parent / "runs" / "zoo"


def test_unknown_names_and_profiles_are_config_errors_listing_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="clip-tiny, vit-tiny, resnet-tiny"):
        pretrained("clip-huge", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="tiny, study"):
        pretrained("vit-tiny", profile="paper", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="dinov2:tiny"):
        pretrained("resnet-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    assert not any(tmp_path.iterdir())


# --- Training -------------------------------------------------------------------------------------------------------


TINY_CLIP = dataclasses.replace(TINY_VISION, backbone="clip:tiny", objective="contrastive", lr=5e-4)


def test_contrastive_pretraining_lowers_the_held_out_losses():
    spec = dataclasses.replace(TINY_CLIP, steps=30, batch_size=32, n_scenes=640, n_val_scenes=20, warmup_steps=5)
    backbone, run = pretrain(spec)
    before, after, chance = (run["metrics"][k] for k in ("before", "after", "chance"))
    assert isinstance(backbone, CLIPBackbone) and not backbone.training
    assert chance["retrieval_top1"] == pytest.approx(0.05)
    assert after["caption_loss"] < before["caption_loss"] - 0.1
    assert after["region_loss"] < before["region_loss"] - 0.1
    assert run["loss_curve"]["loss"][-1] < run["loss_curve"]["loss"][0]


@pytest.mark.slow
def test_contrastive_pretraining_retrieves_held_out_captions_far_above_chance():
    # Contrastive learning from scratch starts slowly: retrieval takes off after ~50 steps of 32 at 128 px.
    spec = dataclasses.replace(
        TINY_CLIP, steps=100, batch_size=32, n_scenes=1600, n_val_scenes=100, image_size=128, warmup_steps=10
    )
    _, run = pretrain(spec)
    before, after, chance = (run["metrics"][k] for k in ("before", "after", "chance"))
    assert chance["retrieval_top1"] == pytest.approx(0.01)
    assert after["image_to_text_top1"] >= 0.08 and after["text_to_image_top1"] >= 0.08
    assert after["caption_loss"] < before["caption_loss"] - 1.0


def test_multilabel_pretraining_beats_a_trivial_predictor():
    spec = dataclasses.replace(
        TINY_VISION, steps=40, batch_size=16, n_scenes=640, n_val_scenes=100, lr=3e-3, warmup_steps=4
    )
    backbone, run = pretrain(spec)
    before, after, chance = (run["metrics"][k] for k in ("before", "after", "chance"))
    assert isinstance(backbone, DINOv2VisionTower) and not backbone.training
    assert after["loss"] < before["loss"]
    # 40 steps teach colours (shapes take longer): per scene and per token
    assert after["label_map"] > chance["label_map"] + 0.05
    assert after["color_map"] > chance["color_map"] + 0.2
    assert after["token_color_accuracy"] > chance["token_color_accuracy"] + 0.15


@pytest.mark.parametrize(
    "spec",
    [
        TINY_VISION,
        dataclasses.replace(TINY_VISION, backbone="resnet18+detr:tiny"),
        TINY_CLIP,
    ],
    ids=lambda spec: spec.backbone,
)
def test_the_same_spec_gives_bitwise_the_same_weights(spec):
    torch.manual_seed(123)
    caller_state = torch.get_rng_state()
    first, first_report = pretrain(spec)
    assert torch.equal(torch.get_rng_state(), caller_state)  # the caller's RNG is left alone
    second, second_report = pretrain(spec)
    assert _equal_state_dicts(first, second)
    assert first_report["metrics"] == second_report["metrics"]
    third, _ = pretrain(dataclasses.replace(spec, seed=1))
    assert not _equal_state_dicts(first, third)


def test_the_report_has_spec_metrics_curve_and_times():
    _, run = pretrain(dataclasses.replace(TINY_VISION, steps=3, log_every=2))
    assert run["spec"] == dataclasses.asdict(dataclasses.replace(TINY_VISION, steps=3, log_every=2))
    assert run["loss_curve"]["step"] == [2, 3]
    assert set(run["loss_curve"]) == {"step", "loss", "label_loss", "token_loss"}
    metrics = {
        "loss",
        "label_map",
        "shape_map",
        "color_map",
        "pair_map",
        "token_color_accuracy",
        "token_shape_accuracy",
    }
    assert metrics <= set(run["metrics"]["after"]) and set(run["metrics"]["chance"]) <= metrics
    assert run["seconds"]["total"] >= run["seconds"]["train"] > 0
    assert run["torch_version"] == torch.__version__


# --- The cache ------------------------------------------------------------------------------------------------------


def test_a_cache_hit_returns_the_same_weights_without_training(tmp_path, counted_pretrain, caplog):
    with caplog.at_level(logging.INFO, logger="vgstudy.zoo"):
        first = pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    assert "pretraining vit-tiny (tiny) on SynthRef" in caplog.text
    entry = cache_path("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    assert sorted(p.name for p in entry.iterdir()) == ["model.safetensors", "report.json"]
    second = pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    assert len(counted_pretrain) == 1
    assert isinstance(second, DINOv2VisionTower) and not second.training
    assert _equal_state_dicts(first, second)
    cached = report("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    assert cached["name"] == "vit-tiny" and cached["spec_hash"] == TINY_VISION.hash()
    assert set(cached["metrics"]) == {"before", "after", "chance"}
    pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION, force=True)
    assert len(counted_pretrain) == 2


def test_report_of_an_uncached_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not cached"):
        report("clip-tiny", cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["weights", "report"])
def test_a_corrupt_entry_is_reported_and_retrained(tmp_path, counted_pretrain, damage):
    spec = dataclasses.replace(TINY_VISION, backbone="resnet18+detr:tiny")
    original = pretrained("resnet-tiny", cache_dir=tmp_path, spec=spec)
    entry = cache_path("resnet-tiny", cache_dir=tmp_path, spec=spec)
    target = entry / ("model.safetensors" if damage == "weights" else "report.json")
    data = bytearray(target.read_bytes())
    target.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.warns(UserWarning, match="corrupt zoo entry"):
        retrained = pretrained("resnet-tiny", cache_dir=tmp_path, spec=spec)
    assert isinstance(retrained, ResNetDETREncoder)
    assert len(counted_pretrain) == 2
    assert _equal_state_dicts(original, retrained)
    report("resnet-tiny", cache_dir=tmp_path, spec=spec)  # the entry is whole again


def test_an_entry_that_does_not_fit_is_a_checkpoint_error_naming_the_file(tmp_path, counted_pretrain):
    pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    entry = cache_path("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    weights = entry / "model.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 7)}, str(weights))  # another architecture, with a valid checksum
    cached = json.loads((entry / "report.json").read_text())
    cached["files"]["model.safetensors"] = zoo.sha256_file(weights)
    (entry / "report.json").write_text(json.dumps(cached))
    with pytest.raises(CheckpointError, match=str(weights)):
        pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION, force=True)
    assert len(counted_pretrain) == 2
    pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)


def test_an_interrupted_write_leaves_no_finished_looking_entry(tmp_path, monkeypatch, counted_pretrain):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "atomic_write_json", killed)  # dies after the weights, before the report
    with pytest.raises(KeyboardInterrupt):
        pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    entry = cache_path("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    assert not entry.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"{entry.name}.lock"]
    with pytest.raises(CheckpointError, match="not cached"):
        report("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    monkeypatch.undo()
    # a process killed outright (no clean-up) leaves a temporary folder: it is not an entry, and it is removed
    (tmp_path / f".tmp-{entry.name}.0123").mkdir()
    pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, f"{entry.name}.lock"])
    report("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)


def test_concurrent_callers_train_once(tmp_path, counted_pretrain):
    models = []
    callers = [
        threading.Thread(target=lambda: models.append(pretrained("vit-tiny", cache_dir=tmp_path, spec=TINY_VISION)))
        for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(counted_pretrain) == 1
    assert len(models) == 2 and _equal_state_dicts(*models)


# --- Metrics --------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 30).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=3, max_size=3), min_size=n, max_size=n),
            st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=n, max_size=n),
        )
    )
)
def test_mean_average_precision_matches_sklearn_without_ties(data):
    scores, labels = torch.tensor(data[0]), torch.tensor(data[1], dtype=torch.float32)
    counted = [c for c in range(3) if 0 < labels[:, c].sum() < len(labels)]
    if not counted or any(len(set(scores[:, c].tolist())) < len(scores) for c in counted):
        return  # sklearn merges tied scores; mean_average_precision breaks ties by index
    expected = sum(average_precision_score(labels[:, c].numpy(), scores[:, c].numpy()) for c in counted)
    assert mean_average_precision(scores, labels) == pytest.approx(expected / len(counted))
    assert mean_average_precision(labels, labels) == pytest.approx(1.0)
