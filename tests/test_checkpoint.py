"""Atomic files, safetensors state dicts, safe torch loading, and verified checkpoint folders."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vgstudy.checkpoint import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_dirs,
    latest_checkpoint,
    load_into,
    load_state_dict,
    prune_checkpoints,
    safe_torch_load,
    save_state_dict,
    sha256_file,
    verify_checkpoint,
    write_checkpoint,
)
from vgstudy.errors import CheckpointError


def test_atomic_write_bytes_replaces_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_json_failing_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"acc50": 1.0})

    def failing_write(temp):
        temp.write_bytes(b'{"acc50": 2.')  # half a file, then the process "dies"
        raise OSError("disk full")

    from vgstudy import checkpoint

    with pytest.raises(OSError, match="disk full"):
        checkpoint._atomic_write(path, failing_write)
    assert json.loads(path.read_text()) == {"acc50": 1.0}
    assert os.listdir(tmp_path) == ["results.json"]


def test_atomic_write_json_writes_paths_as_strings(tmp_path):
    atomic_write_json(tmp_path / "p.json", {"root": tmp_path})
    assert json.loads((tmp_path / "p.json").read_text()) == {"root": str(tmp_path)}


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    (tmp_path / "x").write_bytes(data)
    assert sha256_file(tmp_path / "x") == hashlib.sha256(data).hexdigest()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight  # tied, as language models tie input and output embeddings
        self.register_buffer("steps", torch.tensor(3))


def test_tied_weights_round_trip_strictly(tmp_path):
    model = Tied()
    save_state_dict(tmp_path / "m.safetensors", model.state_dict())
    loaded = load_state_dict(tmp_path / "m.safetensors")
    assert set(loaded) == set(model.state_dict())  # both names of the tied weight kept
    fresh = Tied()
    load_into(fresh, loaded)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.out.weight is fresh.embed.weight  # still tied after loading
    assert fresh.steps.item() == 3


def test_views_and_non_contiguous_tensors_round_trip(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    state = {"t": base.t(), "row": base[1], "base": base}
    save_state_dict(tmp_path / "v.safetensors", state)
    loaded = load_state_dict(tmp_path / "v.safetensors")
    for key, value in state.items():
        assert torch.equal(loaded[key], value)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text("abcdefghij._", min_size=1, max_size=12),
        st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(_DTYPES), st.integers(0, 2**31)),
        max_size=5,
    )
)
def test_state_dict_round_trip_is_exact(tmp_path_factory, spec):
    state = {}
    for key, (shape, dtype, seed) in spec.items():
        g = torch.Generator().manual_seed(seed)
        state[key] = (torch.rand(shape, generator=g) * 100).to(dtype)
    path = tmp_path_factory.mktemp("rt") / "s.safetensors"
    save_state_dict(path, state)
    loaded = load_state_dict(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_truncated_safetensors_file_is_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict(path, nn.Linear(8, 8).state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_state_dict(path)


def test_missing_weights_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "absent.safetensors")


def test_load_into_lists_missing_unexpected_and_mis_shaped_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = model.state_dict()
    del state["1.bias"]
    state["0.weight"] = torch.zeros(5, 3)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_into(model, state)
    message = str(info.value)
    assert "0.weight (checkpoint (5, 3), model (4, 3))" in message
    assert "missing from the checkpoint: 1.bias" in message
    assert "unexpected keys in the checkpoint: extra.weight" in message


def test_load_into_non_strict_reports_but_accepts_missing_keys():
    model = nn.Linear(3, 4)
    state = {"weight": torch.ones(4, 3)}
    missing, unexpected = load_into(model, state, strict=False)
    assert missing == ["bias"] and unexpected == []
    assert torch.equal(model.weight, torch.ones(4, 3))


def test_load_into_caps_the_key_list():
    model = nn.ModuleList([nn.Linear(1, 1) for _ in range(30)])
    with pytest.raises(CheckpointError, match=r"60 keys missing from the checkpoint: .* and 40 more"):
        load_into(model, {})


def test_safe_torch_load_reads_tensors_and_plain_containers(tmp_path):
    obj = {
        "state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(5.0)}},
        "groups": [{"lr": 0.1, "betas": (1, 2)}],
    }
    atomic_torch_save(tmp_path / "o.pt", obj)
    loaded = safe_torch_load(tmp_path / "o.pt")
    assert torch.equal(loaded["state"][0]["exp_avg"], torch.ones(3))
    assert loaded["groups"] == [{"lr": 0.1, "betas": (1, 2)}]


class _Payload:
    """Pickles as a call to os.mkdir(marker): harmless if it ran, and visible if it did."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_safe_torch_load_refuses_an_executable_payload_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"weights": torch.ones(2), "trap": _Payload(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_safe_torch_load_reports_a_truncated_file(tmp_path):
    atomic_torch_save(tmp_path / "o.pt", {"x": torch.ones(100)})
    data = (tmp_path / "o.pt").read_bytes()
    (tmp_path / "o.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="o.pt"):
        safe_torch_load(tmp_path / "o.pt")


def _write(root, step, payload=b"weights"):
    return write_checkpoint(root, step, lambda folder: (folder / "model.bin").write_bytes(payload), {"step": step})


def test_write_checkpoint_records_checksums_and_verifies(tmp_path):
    path = _write(tmp_path, 7)
    assert path.name == "step-7"
    state = verify_checkpoint(path)
    assert state["step"] == 7
    assert state["files"] == {"model.bin": hashlib.sha256(b"weights").hexdigest()}


def test_a_corrupted_byte_fails_verification(tmp_path):
    path = _write(tmp_path, 7)
    data = bytearray((path / "model.bin").read_bytes())
    data[3] ^= 0xFF
    (path / "model.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-7: model.bin does not match its sha256"):
        verify_checkpoint(path)


def test_a_folder_without_state_json_is_incomplete(tmp_path):
    (tmp_path / "step-3").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(tmp_path / "step-3")


def test_a_failed_write_leaves_no_checkpoint_folder(tmp_path):
    def failing(folder):
        (folder / "model.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, 5, failing, {"step": 5})
    assert os.listdir(tmp_path) == []


def test_latest_checkpoint_skips_a_corrupt_newer_one_with_a_warning(tmp_path):
    _write(tmp_path, 2)
    _write(tmp_path, 10)
    (tmp_path / "step-10" / "model.bin").write_bytes(b"garbage")
    (tmp_path / ".tmp-step-12.abc").mkdir()  # a killed write: ignored
    with pytest.warns(UserWarning, match="step-10"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-2"


def test_latest_checkpoint_orders_steps_numerically(tmp_path):
    for step in (9, 10, 100):
        _write(tmp_path, step)
    assert latest_checkpoint(tmp_path).name == "step-100"
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-9", "step-10", "step-100"]


def test_latest_checkpoint_none_and_all_bad(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    (tmp_path / "step-1").mkdir()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        latest_checkpoint(tmp_path)


def test_write_checkpoint_replaces_the_same_step(tmp_path):
    _write(tmp_path, 4, b"first")
    path = _write(tmp_path, 4, b"second")
    assert (path / "model.bin").read_bytes() == b"second"
    verify_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-4"]


def test_prune_keeps_the_newest_and_removes_temporary_folders(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step)
    (tmp_path / ".tmp-step-5.abc").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
