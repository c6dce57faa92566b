"""Reliability as a suite: repeated kills at random points, a kill inside a checkpoint write, a full disk, and the same
training twice giving the same numbers. (Single faults, corrupt checkpoints and safe loading: test_train.py,
test_checkpoint.py; fuzzed input: test_fuzz.py.)

`VGSTUDY_FUZZ=long` (`make test-long`) kills more often.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

import vgstudy.train
from tests.test_train import REPO, assert_same_weights, log_records, toy_trainer
from vgstudy.checkpoint import checkpoint_dirs, verify_checkpoint
from vgstudy.errors import CheckpointError, ConfigError

LONG = os.environ.get("VGSTUDY_FUZZ") == "long"
KILL_ROUNDS = 12 if LONG else 3

# The child trains the toy run of test_train.py and SIGKILLs itself: at its `calls`-th criterion call, or, with
# `in_write`, while the next checkpoint's state.json is being written (its payload already on disk).
CHILD = """
import os, signal, sys
import vgstudy.checkpoint as checkpoint
from tests.test_train import CrashAt, toy_trainer
from vgstudy.losses import BoxCriterion

run_dir, calls, in_write = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if in_write:
    write_json = checkpoint.atomic_write_json

    def dying_write(path, obj):
        if str(path).endswith("state.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        write_json(path, obj)

    checkpoint.atomic_write_json = dying_write
toy_trainer(run_dir, criterion=BoxCriterion() if in_write else CrashAt(calls, kill=True)).fit()
"""


def _run_child(run_dir, calls: int, in_write: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    args = [sys.executable, "-c", CHILD, str(run_dir), str(calls), "1" if in_write else "0"]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = toy_trainer(run_dir)
    trainer.fit()
    return {"weights": trainer.model.state_dict(), "log": log_records(run_dir)}


def test_killed_at_random_points_again_and_again_the_run_ends_as_if_never_killed(tmp_path, reference):
    rng = random.Random(20261125)
    kills = []
    for _ in range(KILL_ROUNDS):
        calls = rng.randint(1, 7)  # criterion calls after this process (re)started: a random training step
        done = _run_child(tmp_path, calls)
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert not (tmp_path / "results.json").exists()
        kills.append(calls)
    # One more kill in the middle of a checkpoint write: the half-written folder must never be taken for a checkpoint.
    done = _run_child(tmp_path, 0, in_write=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    for folder in checkpoint_dirs(tmp_path / "checkpoints"):
        verify_checkpoint(folder)  # every folder that looks like a checkpoint is a whole one
    trainer = toy_trainer(tmp_path)
    results = trainer.fit()
    assert results["resumed_from"] is not None
    assert_same_weights(trainer.model.state_dict(), reference["weights"])
    assert log_records(tmp_path) == reference["log"], f"kills at calls {kills}: the log lost or repeated steps"


def test_a_full_disk_is_an_error_before_training(tmp_path, monkeypatch):
    usage = vgstudy.train.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(vgstudy.train.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(ConfigError, match=r"0\.0 MiB free on its disk, but a checkpoint needs about"):
        toy_trainer(tmp_path / "run")
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_a_disk_that_fills_up_mid_run_names_the_checkpoint_and_keeps_the_earlier_ones(tmp_path, reference, monkeypatch):
    save = vgstudy.train.save_state_dict
    writes = []

    def filling_disk(path, state_dict):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(path, state_dict)

    monkeypatch.setattr(vgstudy.train, "save_state_dict", filling_disk)
    with pytest.raises(CheckpointError, match=r"checkpoint step-8 could not be written into .*No space left on device"):
        toy_trainer(tmp_path).fit()
    kept = checkpoint_dirs(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-3", "step-6"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-6"]  # no leftovers
    monkeypatch.setattr(vgstudy.train, "save_state_dict", save)  # space freed: the run goes on from step 6
    trainer = toy_trainer(tmp_path)
    assert trainer.fit()["resumed_from"].endswith("step-6")
    assert_same_weights(trainer.model.state_dict(), reference["weights"])


def _tiny_transvg_run(run_dir):
    from vgstudy.data import SynthRef
    from vgstudy.experiment import train_and_evaluate
    from vgstudy.models import build, build_backbone
    from vgstudy.train import Stage

    torch.manual_seed(0)
    overrides = {"visual": "dinov2:tiny", "freeze_visual": True, "freeze_text": True}
    model = build("transvg-tiny", **{**overrides, "visual_module": build_backbone("dinov2:tiny")})
    results = train_and_evaluate(
        model,
        SynthRef("train", 16, seed=0, image_size=64),
        {"testB": SynthRef("testB", 8, seed=0, image_size=64)},
        run_dir,
        stages=(Stage("train", epochs=1, lr=5e-4),),
        batch_size=8,
        seed=0,
        model_card=("transvg-tiny", overrides),
    )
    return results, model.state_dict()


def test_the_same_tiny_training_twice_gives_the_same_metrics_and_weights(tmp_path):
    first, weights = _tiny_transvg_run(tmp_path / "first")
    second, again = _tiny_transvg_run(tmp_path / "second")
    assert first["steps"] == second["steps"] == 2
    assert json.dumps(first["metrics"], sort_keys=True) == json.dumps(second["metrics"], sort_keys=True)
    assert_same_weights(weights, again)
    # The run's model card lets `predict` rebuild the model from the run folder alone, strictly.
    from vgstudy.data import SynthRef
    from vgstudy.predict import load_predictor

    predictor = load_predictor(tmp_path / "first")
    assert_same_weights(predictor.model.state_dict(), weights)
    sample = SynthRef("testB", 1, seed=0, image_size=64)[0]
    assert len(predictor.predict(sample.image.permute(1, 2, 0).numpy(), sample.text).box_xyxy) == 4


@pytest.mark.slow
def test_a_notebook_run_twice_gives_the_same_rounded_results(tmp_path):
    """What nbval relies on: notebook 01 (zoo backbones, training, evaluation), same parameters and seed, twice."""
    from vgstudy import study

    notebook = study.find_notebook("01")
    given = {"variants": "random,clip", "n_train": 64, "n_eval": 20, "out_dir": str(tmp_path)}
    if (REPO / "runs" / "zoo").is_dir():  # the pretrained small backbones, when cached: only the training repeats
        (tmp_path / "zoo").symlink_to(REPO / "runs" / "zoo")
    metrics = []
    for run_id in ("first", "second"):
        run = study.plan_run(notebook, {**given, "run_id": run_id})
        record = study.execute(run)
        assert record["status"] == "done", record["error"]
        results = json.loads((run.run_dir / "results.json").read_text())
        metrics.append({v: r["metrics"] for v, r in results["results"].items()})
    assert json.dumps(metrics[0], sort_keys=True) == json.dumps(metrics[1], sort_keys=True)
