"""What every method notebook does the same way: load the active data set, train a model on it, evaluate every split.

A notebook's parameters (a `vgstudy.config.DataParams` or a subclass) choose SynthRef or a real data set; the
training is the one `vgstudy.train.Trainer`, so a run writes the same log, checkpoints and results.json wherever it
comes from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from vgstudy.config import DataParams
from vgstudy.data.refer import DATASETS, load_split
from vgstudy.data.synthref import SynthRef
from vgstudy.data.transforms import GroundingTransform, RememberedItems, TransformedDataset, collate
from vgstudy.errors import ConfigError
from vgstudy.evaluate import BASELINES, SCENE_BASELINES, evaluate_baseline
from vgstudy.losses import BoxCriterion
from vgstudy.models.memo import BackboneMemo
from vgstudy.train import Stage, TrainConfig, Trainer


def eval_split_names(params: DataParams) -> tuple[str, ...]:
    """The splits reported for the data set: val/testA/testB for SynthRef and RefCOCO(+), its held-out ones else."""
    if params.dataset == "synthref":
        return ("val", "testA", "testB")
    return tuple(split for split in DATASETS[params.dataset].splits if split not in ("train", "trainval"))


def grounding_data(params: DataParams) -> tuple[Dataset, dict[str, Dataset]]:
    """(train set, {split: eval set}) of raw samples for the parameters' data set (SynthRef: n_train / n_eval)."""
    if params.dataset == "synthref":
        options = {"seed": params.seed, "image_size": params.image_size, "object_scale": params.object_scale}
        train = SynthRef("train", params.n_train, **options)
        evals = {split: SynthRef(split, params.n_eval, **options) for split in eval_split_names(params)}
        return train, evals
    load = dict(root=params.data_root, dataset=params.dataset, image_root=params.image_root)
    return load_split(split="train", **load), {
        split: load_split(split=split, **load) for split in eval_split_names(params)
    }


def baselines(evals: Mapping[str, Dataset], seed: int = 0) -> dict[str, dict[str, float]]:
    """Acc@0.5 (%) of every trivial baseline (notebook 00) per split: {baseline: {split: acc50}}.

    The object baselines need every object of a scene, which only SynthRef samples carry (`sample.scene`); real data
    sets get the box-only ones.
    """
    with_scenes = all(getattr(data[0], "scene", None) is not None for data in evals.values() if len(data))
    names = [name for name in BASELINES if with_scenes or name not in SCENE_BASELINES]
    return {
        name: {split: evaluate_baseline(name, data, seed=seed)["acc50"] for split, data in evals.items()}
        for name in names
    }


def train_and_evaluate(
    model: nn.Module,
    train: Dataset,
    evals: Mapping[str, Dataset],
    run_dir: str | Path,
    *,
    stages: tuple[Stage, ...],
    batch_size: int,
    seed: int,
    device: str = "cpu",
    criterion=None,
    augment: bool = True,
    params: Mapping | None = None,
    resume: str | bool = "auto",
    model_card: tuple[str, Mapping] | None = None,
    remember_backbones: bool = False,
) -> dict:
    """Train `model` with the Trainer (its own train/eval transforms) and evaluate every split at the end.

    Returns the Trainer's results dict ("metrics" per split: acc50, acc75, miou, n; "train_time_s", "steps", ...).
    `resume="auto"` continues a killed run in the same run_dir; a finished one is not retrained.
    `model_card=(registered name, JSON-able build overrides)` is written to run_dir/model.json first, so
    `python -m vgstudy predict --checkpoint run_dir` can rebuild the model without being told its name.
    `remember_backbones=True` (needs augment=False and a model with frozen backbones) keeps the transformed training
    items and the frozen backbones' outputs in memory after their first use (`vgstudy.models.memo`): every epoch after
    the first runs only what trains. The memo is dropped when training ends.
    """
    if remember_backbones:
        if augment:
            raise ConfigError(
                "train_and_evaluate(remember_backbones=True) needs augment=False: augmented inputs differ every epoch, "
                "so there is nothing to remember"
            )
        if not hasattr(model, "remember_frozen_backbones"):
            raise ConfigError(
                f"train_and_evaluate(remember_backbones=True): a {type(model).__name__} cannot remember its backbones' "
                "outputs (no remember_frozen_backbones method)"
            )
    if model_card is not None:
        from vgstudy.predict import write_model_card  # local import: predict imports the models

        name, overrides = model_card
        write_model_card(run_dir, name, dict(overrides))
    train_config = dataclasses.replace(model.transform, train=augment)
    train_set = TransformedDataset(train, GroundingTransform(train_config))
    if remember_backbones:
        train_set = RememberedItems(train_set)
        model.remember_frozen_backbones(BackboneMemo())
    eval_transform = GroundingTransform(model.transform)
    eval_sets = {split: TransformedDataset(data, eval_transform) for split, data in evals.items()}
    config = TrainConfig(stages=stages, batch_size=batch_size, seed=seed, eval_every_epochs=0)
    trainer = Trainer(
        model,
        criterion or BoxCriterion(),
        train_set,
        config,
        run_dir,
        collate_fn=collate,
        eval_sets=eval_sets,
        device=device,
        params=params,
    )
    try:
        return trainer.fit(resume=resume)
    finally:
        if remember_backbones:
            model.remember_frozen_backbones(None)
