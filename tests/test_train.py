"""The Trainer: configuration checks, schedules, parameter groups, multi-stage training, exact resume, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._toy import StagedToyModel, ToyGroundingModel, ToyGroundingSet, toy_collate
from vgstudy.checkpoint import load_state_dict, safe_torch_load
from vgstudy.errors import CheckpointError, ConfigError
from vgstudy.losses import BoxCriterion
from vgstudy.train import Stage, TrainConfig, Trainer, lr_multiplier, parameter_groups

REPO = Path(__file__).resolve().parents[1]

# Two stages (the first freezes the image encoder), warm-up, a step schedule, per-prefix lr, clipping, dropout and
# random item noise: everything a resumed run has to restore. 32 samples / batch 4 = 8 steps per epoch, 24 in all.
STAGES = (
    Stage("warmup", epochs=1, lr=1e-2, warmup_steps=2),
    Stage("all", epochs=2, lr=1e-2, lr_scale={"image_encoder.": 0.5}, schedule="step", step_milestones=(0.5,)),
)


def toy_config(**overrides) -> TrainConfig:
    options = dict(
        stages=STAGES, batch_size=4, grad_clip=1.0, checkpoint_every_steps=3, log_every_steps=5, keep_checkpoints=3
    )
    return TrainConfig(**{**options, **overrides})


def toy_trainer(run_dir, config=None, model=None, criterion=None, n_train=32) -> Trainer:
    if model is None:
        torch.manual_seed(0)
        model = StagedToyModel()
    return Trainer(
        model,
        criterion or BoxCriterion(),
        ToyGroundingSet(n_train),
        config or toy_config(),
        run_dir,
        collate_fn=toy_collate,
        eval_sets={"val": ToyGroundingSet(16, seed=1)},
        params={"profile": "test", "out_dir": Path(run_dir)},
    )


def log_records(run_dir, kinds=("train", "eval")) -> list[dict]:
    """log.jsonl without the fields that depend on timing."""
    records = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in records if r["kind"] in kinds]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


class CrashAt:
    """The box criterion, until its `n`-th call: then the run dies (an exception, or SIGKILL of the process)."""

    def __init__(self, n: int, kill: bool = False) -> None:
        self.n, self.kill, self.calls = n, kill, 0

    def __call__(self, output, batch):
        self.calls += 1
        if self.calls == self.n:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt(f"crash at call {self.n}")
        return BoxCriterion()(output, batch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its final weights, log and results."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = toy_trainer(run_dir)
    results = trainer.fit()
    return {"weights": trainer.model.state_dict(), "log": log_records(run_dir), "results": results, "dir": run_dir}


# --- Configuration --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(stages=(), batch_size=4), "stages must be a non-empty tuple"),
        (lambda: Stage("s", epochs=1, lr=0.0), "lr must be a number > 0"),
        (lambda: Stage("s", epochs=1, lr="1e-4"), "lr must be a number > 0, got '1e-4'"),
        (lambda: Stage("s", epochs=0, lr=1e-3), "epochs must be an integer >= 1"),
        (lambda: Stage("s", epochs=1, lr=1e-3, schedule="linear"), "schedule must be one of"),
        (lambda: Stage("s", epochs=1, lr=1e-3, step_milestones=(1.5,)), "step_milestones"),
        (lambda: toy_config(amp="fp16"), "amp must be one of"),
        (lambda: toy_config(batch_size=0), "batch_size must be an integer >= 1"),
        (lambda: toy_config(grad_clip=0), "grad_clip must be a number > 0 or None"),
        (lambda: toy_config(keep_checkpoints=0), "keep_checkpoints"),
    ],
)
def test_bad_configuration_is_a_config_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_unwritable_run_dir_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="a_file/run cannot be created"):
        toy_trainer(tmp_path / "a_file" / "run")


def test_too_few_samples_for_one_batch(tmp_path):
    with pytest.raises(ConfigError, match="3 samples: too few for one batch of batch_size=4"):
        toy_trainer(tmp_path, n_train=3)


# --- Schedules and parameter groups ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    schedule=st.sampled_from(["cosine", "step", "constant"]),
    total=st.integers(1, 300),
    warmup=st.integers(0, 50),
    milestones=st.lists(st.floats(0.05, 1.0), max_size=3),
)
def test_lr_multiplier_warms_up_linearly_then_follows_the_schedule(schedule, total, warmup, milestones):
    stage = Stage("s", 1, 1e-3, schedule=schedule, warmup_steps=warmup, step_milestones=tuple(milestones))
    factors = [lr_multiplier(stage, s, total) for s in range(max(total, warmup + 1))]
    assert all(0 < f <= 1 for f in factors[:total])
    for s in range(min(warmup, len(factors))):
        assert factors[s] == pytest.approx((s + 1) / warmup)
    after = factors[warmup:total]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # never increases after warm-up
    if schedule == "constant":
        assert all(f == 1 for f in after)
    if schedule == "step" and warmup == 0:
        for s, f in enumerate(factors[:total]):
            assert f == pytest.approx(0.1 ** sum(s >= m * total for m in milestones))
    if schedule == "cosine" and after:
        assert after[0] == 1 and (len(after) == 1 or after[-1] < 1)


def test_parameter_groups_longest_prefix_decay_split_and_frozen_excluded():
    model = ToyGroundingModel()
    stage = Stage("s", 1, 1e-2, lr_scale={"image_encoder.": 0.1, "image_encoder.1.": 0.5})
    groups = parameter_groups(model, stage, weight_decay=0.05)
    by_param = {id(p): g for g in groups for p in g["params"]}
    lr = {name: by_param[id(p)]["lr"] for name, p in model.named_parameters() if id(p) in by_param}
    assert lr["image_encoder.1.weight"] == pytest.approx(5e-3)  # the conv: the longer prefix wins
    assert lr["image_encoder.4.weight"] == pytest.approx(1e-3)
    assert lr["head.0.weight"] == pytest.approx(1e-2)
    assert "pixel_scale" not in lr  # frozen
    decay = {name: by_param[id(p)]["weight_decay"] for name, p in model.named_parameters() if id(p) in by_param}
    assert decay["head.0.weight"] == 0.05 and decay["head.0.bias"] == 0.0 and decay["image_encoder.1.bias"] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_an_lr_scale_prefix_matching_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\['imge_encoder.'\] match no parameter"):
        parameter_groups(ToyGroundingModel(), Stage("s", 1, 1e-2, lr_scale={"imge_encoder.": 0.1}), 0.0)


# --- A run ----------------------------------------------------------------------------------------------------------


def test_loss_goes_down_and_the_run_writes_its_outputs(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(stages=(Stage("all", 8, 1e-2, warmup_steps=4),), batch_size=8, log_every_steps=4)
    trainer = toy_trainer(tmp_path, config=config, model=ToyGroundingModel(), n_train=64)
    results = trainer.fit()
    losses = [r["loss"] for r in log_records(tmp_path, kinds=("train",))]
    assert losses[-1] < 0.8 * losses[0]
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"] == results["metrics"] and set(results["metrics"]) == {"val"}
    assert results["steps"] == 64 and results["samples_seen"] == 512
    assert results["parameters"]["total"] > results["parameters"]["trainable"] > 0
    assert results["params"]["profile"] == "test" and results["config"]["batch_size"] == 8
    assert set(results["versions"]) == {"python", "torch", "torchvision", "vgstudy", "platform"}
    assert results["git_commit"] and results["samples_per_s"] > 0 and results["best"]["split"] == "val"
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-56", "step-64"]  # keep 2
    assert len(log_records(tmp_path, kinds=("eval",))) == 8


def test_each_stage_logs_its_trainable_count_and_frozen_parameters_stay(reference):
    stage_lines = log_records(reference["dir"], kinds=("stage",))
    assert [(r["stage"], r["step"]) for r in stage_lines] == [("warmup", 0), ("all", 8)]
    assert stage_lines[0]["trainable"] < stage_lines[1]["trainable"] == stage_lines[1]["total"] - 1  # - pixel_scale
    torch.manual_seed(0)
    initial = StagedToyModel().state_dict()
    final = reference["weights"]
    assert torch.equal(final["pixel_scale"], initial["pixel_scale"])
    assert not torch.equal(final["image_encoder.1.weight"], initial["image_encoder.1.weight"])


def test_the_log_has_a_line_per_log_step_checkpoint_and_epoch_end(reference):
    steps = [r["step"] for r in reference["log"] if r["kind"] == "train"]
    assert steps == [3, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 21, 24]
    assert [r["step"] for r in reference["log"] if r["kind"] == "eval"] == [8, 16, 24]


def test_warmup_stage_freezes_the_image_encoder(tmp_path):
    torch.manual_seed(0)
    model = StagedToyModel()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    config = toy_config(stages=STAGES[:1])
    trainer = toy_trainer(tmp_path, config=config, model=model)
    trainer.fit()
    weights = model.state_dict()
    assert torch.equal(weights["image_encoder.1.weight"], initial["image_encoder.1.weight"])
    assert not torch.equal(weights["head.0.weight"], initial["head.0.weight"])
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in optimised for p in model.image_encoder.parameters())
    saved = safe_torch_load(tmp_path / "checkpoints" / "step-8" / "optimizer.pt")["optimizer"]
    assert sum(len(g["params"]) for g in saved["param_groups"]) == len(optimised)


# --- Exact resume ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_call", [9, 21], ids=["at-stage-boundary", "mid-epoch"])
def test_a_crashed_run_resumes_to_bitwise_the_same_weights(tmp_path, reference, crash_call):
    with pytest.raises(KeyboardInterrupt):
        toy_trainer(tmp_path, criterion=CrashAt(crash_call)).fit()
    assert not (tmp_path / "results.json").exists()
    trainer = toy_trainer(tmp_path)
    results = trainer.fit(resume="auto")
    assert results["resumed_from"] is not None
    assert_same_weights(trainer.model.state_dict(), reference["weights"])
    assert log_records(tmp_path) == reference["log"]  # no step logged twice or lost
    assert results["metrics"] == reference["results"]["metrics"]
    assert results["best"] == reference["results"]["best"]


def test_a_killed_process_resumes_to_bitwise_the_same_weights(tmp_path, reference):
    script = f"""
import torch
from tests.test_train import CrashAt, toy_trainer
toy_trainer({str(tmp_path)!r}, criterion=CrashAt(14, kill=True)).fit()
"""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"step-8", "step-9", "step-12"}  # keep 3
    trainer = toy_trainer(tmp_path)
    trainer.fit()
    assert_same_weights(trainer.model.state_dict(), reference["weights"])
    assert log_records(tmp_path) == reference["log"]


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, reference):
    with pytest.raises(KeyboardInterrupt):
        toy_trainer(tmp_path, criterion=CrashAt(14)).fit()
    weights = tmp_path / "checkpoints" / "step-12" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    trainer = toy_trainer(tmp_path)
    with pytest.warns(UserWarning, match="step-12: model.safetensors does not match its sha256"):
        results = trainer.fit()
    assert results["resumed_from"].endswith("step-9")
    assert_same_weights(trainer.model.state_dict(), reference["weights"])
    assert log_records(tmp_path) == reference["log"]


def test_data_loader_workers_do_not_change_the_result(tmp_path, reference):
    trainer = toy_trainer(tmp_path, config=toy_config(num_workers=2))
    trainer.fit()
    assert_same_weights(trainer.model.state_dict(), reference["weights"])


def test_resume_from_an_explicit_checkpoint_folder(tmp_path, reference):
    with pytest.raises(KeyboardInterrupt):
        toy_trainer(tmp_path, criterion=CrashAt(14)).fit()
    trainer = toy_trainer(tmp_path)
    results = trainer.fit(resume=tmp_path / "checkpoints" / "step-9")  # not the newest (step-12)
    assert results["resumed_from"].endswith("step-9")
    assert_same_weights(trainer.model.state_dict(), reference["weights"])


def test_a_checkpoint_that_does_not_fit_the_model_lists_the_keys(tmp_path, reference):
    with pytest.raises(KeyboardInterrupt):
        toy_trainer(tmp_path, criterion=CrashAt(5)).fit()
    with pytest.raises(CheckpointError, match=r"word_embedding.weight \(checkpoint \(64, 8\), model \(64, 4\)\)"):
        toy_trainer(tmp_path, model=StagedToyModel(text_dim=4)).fit()


def test_a_checkpoint_of_a_different_run_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        toy_trainer(tmp_path, criterion=CrashAt(5)).fit()
    with pytest.raises(CheckpointError, match=r"config fields \['seed'\] differ"):
        toy_trainer(tmp_path, config=toy_config(seed=1)).fit()


def test_resume_false_starts_afresh_and_resume_true_needs_a_checkpoint(tmp_path, reference):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        toy_trainer(tmp_path).fit(resume=True)
    with pytest.raises(KeyboardInterrupt):
        toy_trainer(tmp_path, criterion=CrashAt(20)).fit()
    trainer = toy_trainer(tmp_path)
    with pytest.warns(UserWarning, match="starting afresh"):
        results = trainer.fit(resume=False)
    assert results["resumed_from"] is None
    assert_same_weights(trainer.model.state_dict(), reference["weights"])
    assert log_records(tmp_path) == reference["log"]
    with pytest.raises(ConfigError, match="resume must be"):
        toy_trainer(tmp_path).fit(resume=3)


# --- Data-parallel --------------------------------------------------------------------------------------------------

_DDP_SCRIPT = """
import os, sys
import torch
from tests._toy import StagedToyModel
from tests.test_train import toy_config, toy_trainer
from vgstudy.checkpoint import save_state_dict

run_dir = sys.argv[1]
torch.manual_seed(int(os.environ["RANK"]))  # different initial weights per rank: DDP must broadcast rank 0's
model = StagedToyModel(dropout=0.0)
trainer = toy_trainer(run_dir, config=toy_config(batch_size=4), model=model)
results = trainer.fit()
save_state_dict(os.path.join(run_dir, f"rank{os.environ['RANK']}.safetensors"), model.state_dict())
assert results["world_size"] == 2 and results["steps"] == 12  # 32 samples / 2 processes / batch 4 x 3 epochs
"""


def test_two_processes_train_identical_weights_equal_to_one_process_with_twice_the_batch(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, "--no-python", sys.executable, "-c", _DDP_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_state_dict(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert_same_weights(rank0, rank1)
    assert len(list(tmp_path.glob("results.json"))) == 1
    steps = [r["step"] for r in log_records(tmp_path, kinds=("train",))]
    assert steps == sorted(set(steps))  # each step logged once, by rank 0

    # One process, batch 8 = the union of the two processes' batches of 4: the same run up to float rounding.
    torch.manual_seed(0)
    single = StagedToyModel(dropout=0.0)
    toy_trainer(tmp_path / "single", config=toy_config(batch_size=8), model=single).fit()
    for key, value in single.state_dict().items():
        assert torch.allclose(value, rank0[key], atol=1e-4), key  # Adam magnifies rounding of tiny grads
    assert math.isfinite(json.loads((tmp_path / "results.json").read_text())["metrics"]["val"]["miou"])
