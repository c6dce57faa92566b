"""Remembering frozen backbones' outputs (vgstudy.models.memo) and training with it (train_and_evaluate)."""

from __future__ import annotations

import json

import pytest
import torch

from vgstudy.config import DataParams, load
from vgstudy.data.transforms import RememberedItems
from vgstudy.errors import ConfigError
from vgstudy.experiment import grounding_data, train_and_evaluate
from vgstudy.models import build
from vgstudy.models.memo import BackboneMemo, tensor_key
from vgstudy.train import Stage

SMALL_FUSION = {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64}


def test_keys_tell_apart_contents_dtypes_shapes_and_companions():
    row = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_key(row) == tensor_key(row.clone())
    assert tensor_key(row) == tensor_key(row.t().contiguous().t())  # same values, another memory layout
    changed = row.clone()
    changed[2, 3] += 1e-6
    assert tensor_key(row) != tensor_key(changed)
    assert tensor_key(row) != tensor_key(row.double())
    assert tensor_key(row) != tensor_key(row.reshape(4, 3))
    assert tensor_key(row, None) != tensor_key(row, torch.ones(3, 4, dtype=torch.bool))
    assert tensor_key(row, torch.ones(3, 4, dtype=torch.bool)) != tensor_key(row, torch.zeros(3, 4, dtype=torch.bool))


def test_the_memo_computes_each_new_row_once_and_keeps_the_batch_order():
    calls = []

    def compute(rows):
        calls.append(rows.tolist())
        return {"double": 2 * inputs[rows], "same": inputs[rows]}

    memo = BackboneMemo()
    inputs = torch.tensor([[1.0], [2.0], [3.0], [2.0]])
    out = memo.run(["a", "b", "c", "b"], compute)
    assert calls == [[0, 1, 2]]  # the duplicate "b" is computed once
    assert torch.equal(out["double"], 2 * inputs) and torch.equal(out["same"], inputs)
    assert (memo.hits, memo.misses, len(memo)) == (0, 4, 3)

    inputs = torch.tensor([[3.0], [9.0], [1.0]])
    out = memo.run(["c", "d", "a"], compute)
    assert calls[-1] == [1]  # only the new row
    assert torch.equal(out["same"], torch.tensor([[3.0], [9.0], [1.0]]))
    assert (memo.hits, memo.misses, len(memo)) == (2, 5, 4)
    memo.clear()
    assert (memo.hits, memo.misses, len(memo)) == (0, 0, 0)


def test_rows_without_a_key_are_computed_every_time_and_never_remembered():
    calls = []
    inputs = torch.tensor([[1.0], [2.0], [3.0]])

    def compute(rows):
        calls.append(rows.tolist())
        return {"x": inputs[rows]}

    memo = BackboneMemo()
    assert torch.equal(memo.run([None, "b", None], compute)["x"], inputs)
    assert torch.equal(memo.run([None, "b", None], compute)["x"], inputs)
    assert calls == [[0, 1, 2], [0, 2]]
    assert (memo.hits, memo.misses, len(memo)) == (1, 5, 1)


def test_a_full_memo_still_answers_but_remembers_nothing_more():
    memo = BackboneMemo(max_entries=2)
    inputs = torch.arange(4.0).unsqueeze(1)
    out = memo.run(["a", "b", "c", "d"], lambda rows: {"x": inputs[rows]})
    assert torch.equal(out["x"], inputs)
    assert len(memo) == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_a_bad_size_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="max_entries"):
        BackboneMemo(max_entries=bad)


@pytest.fixture(scope="module")
def frozen_tiny():
    torch.manual_seed(0)
    model = build("transvg-tiny", visual="dinov2:tiny", freeze_visual=True, freeze_text=True, **SMALL_FUSION)
    return model.eval()


def test_transvg_with_a_memo_gives_the_same_boxes_and_runs_the_backbones_once(frozen_tiny):
    model = frozen_tiny
    torch.manual_seed(1)
    images = torch.randn(3, 3, model.image_size, model.image_size)
    valid = torch.ones(3, model.image_size, model.image_size, dtype=torch.bool)
    valid[1, :, 100:] = False
    texts = ["the red circle", "the big blue star left of the ring", "the red circle"]
    with torch.no_grad():
        plain = model(images, texts, valid).boxes
        memo = BackboneMemo()
        model.remember_frozen_backbones(memo)
        calls = {"visual": 0, "text": 0}
        hooks = [
            model.visual.register_forward_hook(lambda *_: calls.__setitem__("visual", calls["visual"] + 1)),
            model.text.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1)),
        ]
        try:
            first = model(images, texts, valid).boxes
            again = model(images, texts, valid).boxes
            flipped = model(images[[2, 1, 0]], texts[::-1], valid[[2, 1, 0]]).boxes
        finally:
            for hook in hooks:
                hook.remove()
            model.remember_frozen_backbones(None)
    torch.testing.assert_close(first, plain, atol=1e-6, rtol=0)
    assert torch.equal(again, first)
    torch.testing.assert_close(flipped, first[[2, 1, 0]], atol=1e-6, rtol=0)
    assert calls == {"visual": 1, "text": 1}  # only the first call ran the backbones
    assert memo.misses == 3 + 3 and memo.hits == 2 * 6  # the first call misses its 6 rows, the next two hit them all
    assert len(memo) == 3 + 2  # three images, two distinct texts


def test_the_memo_is_not_part_of_the_model(frozen_tiny):
    keys = set(frozen_tiny.state_dict())
    frozen_tiny.remember_frozen_backbones(BackboneMemo())
    try:
        assert set(frozen_tiny.state_dict()) == keys
    finally:
        frozen_tiny.remember_frozen_backbones(None)


def test_gradients_still_reach_what_trains(frozen_tiny):
    model = frozen_tiny
    model.remember_frozen_backbones(BackboneMemo())
    model.train()
    try:
        images = torch.randn(2, 3, model.image_size, model.image_size)
        for _ in range(2):  # the second pass is answered from memory
            model.zero_grad()
            model(images, ["a red circle", "a blue star"]).boxes.sum().backward()
            assert all(
                p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters() if p.requires_grad
            )
            assert model.visual_proj.weight.grad.abs().sum() > 0 and model.text_proj.weight.grad.abs().sum() > 0
    finally:
        model.remember_frozen_backbones(None)
        model.eval()


def test_a_backbone_that_trains_cannot_be_remembered():
    model = build("transvg-tiny", visual="dinov2:tiny", **SMALL_FUSION)
    with pytest.raises(ConfigError, match="neither backbone is frozen"):
        model.remember_frozen_backbones(BackboneMemo())


def test_only_the_frozen_backbone_is_remembered():
    torch.manual_seed(0)
    model = build("transvg-tiny", visual="dinov2:tiny", freeze_text=True, **SMALL_FUSION).eval()
    memo = BackboneMemo()
    model.remember_frozen_backbones(memo)
    with torch.no_grad():
        model(torch.randn(2, 3, model.image_size, model.image_size), ["a", "b"])
    assert memo.misses == 2 and len(memo) == 2  # the two texts; the visual branch ran as usual


def test_remembered_items_are_computed_once():
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            reads.append(index)
            return {"value": index}

    items = RememberedItems(Counting())
    assert len(items) == 3
    assert [items[i]["value"] for i in (0, 1, 0, 2, 1)] == [0, 1, 0, 2, 1]
    assert reads == [0, 1, 2]


def _tiny_run(tmp_path, name, remember):
    params = load({"n_train": 8, "n_eval": 4}, DataParams)
    train, evals = grounding_data(params)
    torch.manual_seed(0)
    model = build("transvg-tiny", visual="dinov2:tiny", freeze_visual=True, freeze_text=True, **SMALL_FUSION)
    stage = Stage("train", epochs=3, lr=1e-3)
    results = train_and_evaluate(
        model,
        train,
        evals,
        tmp_path / name,
        stages=(stage,),
        batch_size=4,
        seed=0,
        augment=False,
        remember_backbones=remember,
    )
    return model, results


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


def test_training_with_remembered_backbones_matches_training_without(tmp_path):
    plain_model, plain = _tiny_run(tmp_path, "plain", remember=False)
    memo_model, remembered = _tiny_run(tmp_path, "memo", remember=True)
    assert memo_model.memo is None  # dropped when training ends
    assert remembered["steps"] == plain["steps"] == 6
    # The same training up to float rounding (a remembered row was computed in another batch), which Adam's
    # normalised steps can lift to ~1e-4 on parameters whose gradient is ~0 (the attention's key bias).
    torch.testing.assert_close(_losses(tmp_path / "memo"), _losses(tmp_path / "plain"), atol=0, rtol=1e-5)
    for name, value in plain_model.state_dict().items():
        torch.testing.assert_close(memo_model.state_dict()[name], value, atol=1e-3, rtol=0, msg=name)
    for split, metrics in plain["metrics"].items():
        assert remembered["metrics"][split]["miou"] == pytest.approx(metrics["miou"], abs=1e-5)


def test_remembering_needs_fixed_inputs_and_a_model_that_can(tmp_path):
    params = load({"n_train": 4, "n_eval": 2}, DataParams)
    train, evals = grounding_data(params)
    model = build("transvg-tiny", visual="dinov2:tiny", freeze_visual=True, freeze_text=True, **SMALL_FUSION)
    stage = Stage("train", epochs=1, lr=1e-3)
    with pytest.raises(ConfigError, match="augment=False"):
        train_and_evaluate(
            model, train, evals, tmp_path / "a", stages=(stage,), batch_size=2, seed=0, remember_backbones=True
        )
    model = build("hivg-tiny")
    with pytest.raises(ConfigError, match="cannot remember"):
        train_and_evaluate(
            model,
            train,
            evals,
            tmp_path / "b",
            stages=(stage,),
            batch_size=2,
            seed=0,
            augment=False,
            remember_backbones=True,
        )
