"""EpmVG-R's (reconstruction) losses: TransVG's box terms plus four cross-modal distillation terms, each a switch.

    loss = L1 + GIoU + r (w1 D1 + w2 D2 + w3 D3 + w4 D4)

s_I, s_T, s_R are the student's projected, L2-normalised image, text and [REG] embeddings (`EpmVGR`'s aux in train
mode); t_I, t_T, t_C the frozen teacher's embeddings of the image, the expression and the ground-truth crop; tau the
logit temperature (None: the teacher's own, CLIP's learned one; 0.07 for a unimodal teacher).

    D1 feature       ((1 - cos(s_I, t_I)) + (1 - cos(s_T, t_T))) / 2, averaged over the batch
    D2 relation      KL(teacher || student) between the softmaxes of the batch's image-text similarities / tau, per
                     image over the texts and per text over the images, the two directions averaged: the teacher's
                     "image and text consistency" as relations, whatever the student's absolute features are
    D3 contrastive   CLIP's InfoNCE between s_I and s_T (no teacher at all: the control for D2)
    D4 region        ((1 - cos(s_R, t_C)) + (1 - cos(s_R, t_T))) / 2: the [REG] feature pulled to the teacher's
                     embedding of the referred region and of the expression

A weight of 0 switches a term off: it is not computed and not in the returned dict. Warm-up: the distillation
weights ramp linearly, r = min(1, n / warmup_steps) with n the criterion's earlier calls while the model was in train
mode (so r = 0 on the first call, 1 from call warmup_steps + 1 on). n is kept in the model's `distillation_calls`
buffer, so a checkpoint resumes the ramp where it was; calls in eval mode neither count nor change r.

The teacher runs under torch.no_grad and in eval mode: no term sends a gradient into it. With `cache=True` its
embeddings are kept per sample in a `vgstudy.models.memo.BackboneMemo`, keyed by (batch["sources"][i], text)
(samples without a source are never cached), and `cache_hits` / `cache_misses` count samples. That is only right
when the training transform is deterministic (`dataclasses.replace(model.transform, train=False)`, i.e. no
augmentation), so the caller switches it on only then: with random crops or jitter a cached embedding is of another
view of the image. The cache holds 3 x embed_dim floats per sample on the model's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vgstudy.errors import ConfigError
from vgstudy.losses import BoxCriterion
from vgstudy.losses_hivg import contrastive_loss
from vgstudy.models.base import Output
from vgstudy.models.epmvg import AUX_KEYS, EpmVGR
from vgstudy.models.memo import BackboneMemo

DISTILLATION_TERMS = ("feature", "relation", "contrastive", "region")
# The teacher embeddings each term reads ("region" is the teacher's embedding of the ground-truth crop).
_TEACHER_NEEDS = {
    "feature": ("image", "text"),
    "relation": ("image", "text"),
    "contrastive": (),
    "region": ("region", "text"),
}


def feature_distillation(
    student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor, teacher_text: torch.Tensor
) -> torch.Tensor:
    """D1 on unit-norm (B, D) embeddings: the mean cosine distance to the teacher, per modality, averaged."""
    image = 1 - (student_image * teacher_image).sum(dim=-1)
    text = 1 - (student_text * teacher_text).sum(dim=-1)
    return (image.mean() + text.mean()) / 2


def relation_distillation(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """D2 on unit-norm (B, D) embeddings: KL(teacher || student) of the image->texts and text->images softmaxes."""
    student = student_image @ student_text.t() / temperature  # (B, B): image i, text j
    teacher = teacher_image @ teacher_text.t() / temperature

    def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:  # row-wise, mean over rows
        return F.kl_div(
            student_logits.log_softmax(dim=-1),
            teacher_logits.log_softmax(dim=-1),
            log_target=True,
            reduction="batchmean",
        )

    return (kl(student, teacher) + kl(student.t(), teacher.t())) / 2


def region_distillation(
    student_region: torch.Tensor, teacher_crop: torch.Tensor, teacher_text: torch.Tensor
) -> torch.Tensor:
    """D4 on unit-norm (B, D) embeddings: the [REG] feature's mean cosine distance to the crop's and the text's."""
    crop = 1 - (student_region * teacher_crop).sum(dim=-1)
    text = 1 - (student_region * teacher_text).sum(dim=-1)
    return (crop.mean() + text.mean()) / 2


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class EpmVGRCriterion:
    """`criterion(output, batch) -> {"loss", "l1", "giou", and each switched-on term of "feature", "relation",
    "contrastive", "region", unweighted}` for an `EpmVGR` in train mode (see the module docstring).

    model:         the EpmVGR being trained (its teacher and input conversions are used; its warm-up counter too).
    feature, relation, contrastive, region: the weights w1..w4, numbers >= 0.
    warmup_steps:  training calls over which the distillation weights ramp up from 0.
    temperature:   tau for D2 and D3; None: the teacher's.
    cache:         keep the teacher's embeddings per sample; only for a deterministic training transform.
    """

    def __init__(
        self,
        model: EpmVGR,
        *,
        feature: float = 1.0,
        relation: float = 1.0,
        contrastive: float = 0.0,
        region: float = 1.0,
        warmup_steps: int = 0,
        temperature: float | None = None,
        cache: bool = False,
    ):
        if not isinstance(model, EpmVGR):
            raise ConfigError(f"EpmVGRCriterion model is a {type(model).__name__}; expected the EpmVGR being trained")
        weights = {"feature": feature, "relation": relation, "contrastive": contrastive, "region": region}
        for name, value in weights.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ConfigError(f"EpmVGRCriterion {name}={value!r}: expected a finite number >= 0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"EpmVGRCriterion warmup_steps={warmup_steps!r}: expected an int >= 0")
        if temperature is not None and (not _is_finite_number(temperature) or temperature <= 0):
            raise ConfigError(f"EpmVGRCriterion temperature={temperature!r}: expected a finite number > 0 or None")
        if not isinstance(cache, bool):
            raise ConfigError(f"EpmVGRCriterion cache={cache!r}: expected True or False")
        self.model = model
        self.weights = {name: float(value) for name, value in weights.items() if value}
        self.warmup_steps = warmup_steps
        self.temperature = model.teacher.temperature() if temperature is None else float(temperature)
        self.box_criterion = BoxCriterion()  # TransVG's L1 + GIoU, weights 1 and 1
        self.memo = BackboneMemo() if cache else None

    @property
    def cache_hits(self) -> int:
        return 0 if self.memo is None else self.memo.hits

    @property
    def cache_misses(self) -> int:
        return 0 if self.memo is None else self.memo.misses

    @property
    def distillation_scale(self) -> float:
        """The warm-up factor r the next training call puts on the distillation weights."""
        if not self.warmup_steps:
            return 1.0
        return min(1.0, int(self.model.distillation_calls) / self.warmup_steps)

    def __call__(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        terms = self.box_criterion(output, batch)
        loss = terms.pop("loss")
        if self.weights:
            student = self._student_embeddings(output)
            needs = {need for name in self.weights for need in _TEACHER_NEEDS[name]}
            teacher = self.teacher_embeddings(batch, needs)
            if "feature" in self.weights:
                terms["feature"] = feature_distillation(
                    student["image"], student["text"], teacher["image"], teacher["text"]
                )
            if "relation" in self.weights:
                terms["relation"] = relation_distillation(
                    student["image"], student["text"], teacher["image"], teacher["text"], self.temperature
                )
            if "contrastive" in self.weights:
                terms["contrastive"] = contrastive_loss(student["text"] @ student["image"].t() / self.temperature)
            if "region" in self.weights:
                terms["region"] = region_distillation(student["region"], teacher["region"], teacher["text"])
            scale = self.distillation_scale
            loss = loss + scale * sum(weight * terms[name] for name, weight in self.weights.items())
        if self.model.training:
            self.model.distillation_calls += 1
        terms["loss"] = loss
        return terms

    def teacher_embeddings(self, batch: dict, names=("image", "text", "region")) -> dict[str, torch.Tensor]:
        """The teacher's unit-norm (B, embed_dim) float32 embeddings of the batch: "image" (the whole image), "text"
        (the expression), "region" (the ground-truth crop), those in `names`; from the cache where it has them."""
        names = tuple(name for name in ("image", "text", "region") if name in names)
        device = batch["images"].device
        if self.memo is None:
            out = self._compute(batch, list(range(len(batch["texts"]))), names)
        else:
            texts, sources = batch["texts"], batch.get("sources") or [None] * len(batch["texts"])
            keys = [(names, source, text) if source else None for source, text in zip(sources, texts, strict=True)]
            out = self.memo.run(keys, lambda rows: self._compute(batch, rows.tolist(), names))
        return {name: value.to(device) for name, value in out.items()}

    @torch.no_grad()
    def _compute(self, batch: dict, indices: list[int], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        model, teacher = self.model, self.model.teacher
        images = batch["images"][indices]
        valid = batch.get("valid")
        valid = None if valid is None else valid[indices]
        out = {}
        if "image" in names:
            out["image"] = teacher.encode_image(model.teacher_images(images, valid))
        if "text" in names:
            out["text"] = teacher.encode_text([batch["texts"][i] for i in indices])
        if "region" in names:
            out["region"] = teacher.encode_image(model.teacher_crops(images, batch["boxes_cxcywh"][indices], valid))
        return {name: value.float() for name, value in out.items()}

    @staticmethod
    def _student_embeddings(output: Output) -> dict[str, torch.Tensor]:
        absent = [key for key in AUX_KEYS if key not in output.aux]
        if absent:
            raise ConfigError(
                f"EpmVGRCriterion needs output.aux {absent}: an EpmVGR gives its projected embeddings in train mode "
                "only (model.train())"
            )
        return {key.removesuffix("_embedding"): output.aux[key].float() for key in AUX_KEYS}
