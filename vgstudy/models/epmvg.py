"""EpmVG-R (reconstruction) of EpmVG (Wang et al., PRCV 2024): a multimodal teacher distilled into TransVG.

Only the paper's abstract is public: a grounding model with separately pretrained (unimodal) backbones learns the
image-text consistency of a multimodal pretrained model through cross-modal distillation. Everything below is our
reconstruction of that sentence, named EpmVG-R; the choices are ours.

1. Student: a TransVG (`vgstudy.models.transvg`), unchanged. At inference (eval mode) EpmVG-R *is* the student: same
   boxes, same FLOPs; the teacher and the projections only act in training.
2. Teacher (`Teacher`): frozen, always in eval mode. "multimodal": a CLIP, image and text towers, L2-normalised
   embeddings of one shared space. "unimodal" (the control): a vision backbone and a text backbone pretrained apart,
   each mean-pooled; their spaces are not aligned, which is what the control tests.
3. Projections (trainable, dropped after training): the student's pooled visual tokens, pooled text tokens and [REG]
   output, each through a 2-layer MLP (Linear, GELU, Linear; hidden width = the student's `dim`) into the teacher's
   embedding space. A non-linear head, as in contrastive representation learning, lets the distillation shape what
   the student's backbones encode without forcing the fused tokens to be a linear image of the teacher's space.
4. In train mode the model adds the projected, L2-normalised embeddings to `Output.aux`; the teacher's side and the
   losses D1..D4 are computed by `vgstudy.losses_epmvg.EpmVGRCriterion`, which calls `teacher_images` and
   `teacher_crops` here to bring the student's inputs into the teacher's normalisation and size.

The state dict holds the teacher too, so a checkpoint is self-contained; `model.student` alone is the deployable
TransVG. Backbone learning rates as TransVG's release: `Stage(lr=1e-4, lr_scale=LR_SCALE)`. Under DDP train with
`TrainConfig(find_unused_parameters=True)`: a projection whose loss term is switched off gets no gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from vgstudy.data.tokenizers import TokenBatch
from vgstudy.errors import ConfigError
from vgstudy.evaluate import cxcywh_to_xyxy
from vgstudy.models.backbones import CLIPBackbone, ResNetDETREncoder, TextTower, VisionTower, build_backbone
from vgstudy.models.base import Output
from vgstudy.models.memo import BackboneMemo
from vgstudy.models.registry import register
from vgstudy.models.transvg import TransVG, transvg_r50, transvg_tiny

TEACHER_KINDS = ("multimodal", "unimodal")
# TransVG's release rates (lr 1e-4, backbones x 0.1), under the student's names; projections train at lr.
LR_SCALE = {"student.visual.": 0.1, "student.text.": 0.1}
UNIMODAL_TEMPERATURE = 0.07  # CLIP's initial temperature: a unimodal pair has no learned one
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned logit scale here
AUX_KEYS = ("image_embedding", "text_embedding", "region_embedding")


# --- Teachers -------------------------------------------------------------------------------------------------------


class Teacher(nn.Module, ABC):
    """A frozen teacher: `encode_image` and `encode_text` give L2-normalised (B, embed_dim) embeddings.

    Frozen (no parameter requires grad) and always in eval mode, whatever `train()` is asked. Attributes: kind
    ("multimodal" | "unimodal"), embed_dim, image_size (its input side), mean and std (its input normalisation).
    """

    kind: str
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # a fixed target: no dropout, no BatchNorm statistics updated

    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) images in the teacher's normalisation -> (B, embed_dim), unit norm."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """B strings -> (B, embed_dim), unit norm."""

    @abstractmethod
    def temperature(self) -> float:
        """The logit temperature of its image-text similarities (logits = similarity / temperature)."""


class CLIPTeacher(Teacher):
    """The multimodal teacher: a CLIP's own embeddings (projected, normalised) and its learned temperature."""

    kind = "multimodal"

    def __init__(self, clip: CLIPBackbone):
        super().__init__()
        self.clip = clip
        self.embed_dim = clip.embed_dim
        self.image_size = clip.visual.image_size
        self.mean, self.std = clip.visual.mean, clip.visual.std
        self.freeze()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(texts)

    def temperature(self) -> float:
        return 1.0 / min(float(self.clip.logit_scale.exp()), MAX_LOGIT_SCALE)


class UnimodalTeacher(Teacher):
    """The control: a vision backbone and a text backbone pretrained apart, each mean-pooled (grid tokens; real text
    tokens), in one space of width max(D_image, D_text) without learning anything: the narrower one is embedded by a
    fixed matrix with orthonormal columns (a seeded buffer), which keeps its geometry exactly. Within a modality the
    teacher's similarities are its backbone's; across modalities they carry no meaning, the point of the control.
    """

    kind = "unimodal"

    def __init__(self, visual: VisionTower | ResNetDETREncoder, text: TextTower, seed: int = 0):
        super().__init__()
        self.visual, self.text = visual, text
        self.embed_dim = max(visual.width, text.width)
        self.image_size = visual.image_size
        self.mean, self.std = visual.mean, visual.std
        generator = torch.Generator().manual_seed(seed)
        for name, width in (("image_embedding", visual.width), ("text_embedding", text.width)):
            isometry = None
            if width < self.embed_dim:  # (embed_dim, width), orthonormal columns
                isometry = torch.linalg.qr(torch.randn(self.embed_dim, width, generator=generator)).Q
            self.register_buffer(name, isometry)
        self.freeze()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual(images)
        pooled = out.tokens[:, out.num_prefix_tokens :].mean(dim=1)  # (B, D_image): the grid, prefix tokens left out
        return self._embed(pooled, self.image_embedding)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        out = self.text(texts)
        pooled = masked_mean(out.tokens, out.mask)  # (B, D_text)
        return self._embed(pooled, self.text_embedding)

    def temperature(self) -> float:
        return UNIMODAL_TEMPERATURE

    @staticmethod
    def _embed(pooled: torch.Tensor, isometry: torch.Tensor | None) -> torch.Tensor:
        if isometry is not None:
            pooled = pooled @ isometry.t().to(pooled.dtype)
        return F.normalize(pooled, dim=-1)


def build_teacher(
    teacher: str | nn.Module,
    kind: str = "multimodal",
    *,
    weights: str | Path | None = None,
    image_size: int | None = None,
    text: str | nn.Module | None = None,
    text_weights: str | Path | None = None,
) -> Teacher:
    """A `Teacher` from names or built backbones.

    multimodal: `teacher` a CLIP name ("clip:tiny", "clip:ViT-B-16") built with `weights` / `image_size`, or a built
                CLIPBackbone (e.g. `zoo.pretrained("clip-tiny")`); `text` must be None.
    unimodal:   `teacher` a vision backbone (name, or a VisionTower / ResNetDETREncoder) and `text` a text backbone
                (name, or a TextTower), e.g. "dinov2:tiny" and "bert:minilm".
    A Teacher is returned as it is. Built modules are frozen in place.
    """
    if isinstance(teacher, Teacher):
        if kind != teacher.kind or text is not None or weights is not None or image_size is not None:
            raise ConfigError(
                f"EpmVG-R teacher: a built {type(teacher).__name__} ({teacher.kind}) takes no teacher_kind={kind!r} "
                "other than its own, and no teacher_text, teacher_weights or teacher_image_size"
            )
        return teacher
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"EpmVG-R teacher_kind={kind!r}: expected one of {TEACHER_KINDS}")
    visual = _backbone(teacher, "teacher", weights=weights, image_size=image_size)
    if kind == "multimodal":
        if not isinstance(visual, CLIPBackbone):
            raise ConfigError(
                f"EpmVG-R multimodal teacher {_named(teacher)} is a {type(visual).__name__}; expected a CLIPBackbone "
                "(clip:*), or teacher_kind='unimodal' with a vision and a text backbone"
            )
        if text is not None:
            raise ConfigError("EpmVG-R teacher_text: only a unimodal teacher takes one; CLIP has its own text tower")
        return CLIPTeacher(visual)
    if isinstance(visual, CLIPBackbone) or not isinstance(visual, VisionTower | ResNetDETREncoder):
        raise ConfigError(
            f"EpmVG-R unimodal teacher {_named(teacher)} is a {type(visual).__name__}; expected a vision backbone "
            "(dinov2:*, resnet*+detr, a VisionTower); a whole CLIP is the multimodal teacher"
        )
    if text is None:
        raise ConfigError("EpmVG-R unimodal teacher: expected teacher_text, a text backbone (e.g. 'bert:minilm')")
    text_tower = _backbone(text, "teacher_text", weights=text_weights)
    if not isinstance(text_tower, TextTower):
        raise ConfigError(
            f"EpmVG-R teacher_text {_named(text)} is a {type(text_tower).__name__}; expected a text backbone "
            "(bert:*, a TextTower)"
        )
    return UnimodalTeacher(visual, text_tower)


def _backbone(spec: str | nn.Module, where: str, **build_options) -> nn.Module:
    """`spec` built by name, or a built module as it is (then no build option may be given)."""
    if isinstance(spec, str):
        return build_backbone(spec, **{k: v for k, v in build_options.items() if v is not None})
    if not isinstance(spec, nn.Module):
        raise ConfigError(f"EpmVG-R {where}={spec!r}: expected a backbone name or a built backbone module")
    given = sorted(k for k, v in build_options.items() if v is not None)
    if given:
        raise ConfigError(f"EpmVG-R {where}: {given} build a backbone by name; expected none with a built module")
    return spec


def _named(spec: str | nn.Module) -> str:
    return repr(spec) if isinstance(spec, str) else "module"


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, N) bool mask (True = real) -> (B, D) mean over the real tokens."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear, GELU, Linear: the student's width -> the teacher's embedding width (hidden: the student's width)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


# --- The model ------------------------------------------------------------------------------------------------------


class EpmVGR(nn.Module):
    """EpmVG-R (reconstruction): `model(images, texts, valid=None) -> Output`, a TransVG trained with a frozen teacher.

    student:             a built TransVG, or None: `TransVG(**student_options)` (its keyword arguments: visual, text,
                         dim, ...).
    teacher:             see `build_teacher`: a name ("clip:tiny"), a built CLIPBackbone, or for teacher_kind="unimodal"
                         a vision backbone (with `teacher_text`), or a built `Teacher`.
    teacher_kind:        "multimodal" (CLIP) or "unimodal" (the control).
    teacher_weights, teacher_image_size, teacher_text, teacher_text_weights: building the teacher by name.

    Eval mode: exactly the student's output. Train mode: the student's Output with, in aux, the projected and
    L2-normalised (B, teacher.embed_dim) "image_embedding" (the student's visual tokens, averaged over real tokens),
    "text_embedding" (its text tokens, averaged over real tokens) and "region_embedding" (its [REG] output).

    Attributes: student (TransVG), projections (ModuleDict "image", "text", "region"), teacher (Teacher, frozen),
    transform and image_size (the student's), distillation_calls (a buffer the criterion's warm-up counts in, so
    a checkpoint resumes the warm-up where it was). `describe(model)["parts"]` counts student, projections and
    teacher; `inference_parameters()` is the student's count.
    """

    def __init__(
        self,
        student: TransVG | None = None,
        teacher: str | nn.Module = "clip:tiny",
        *,
        teacher_kind: str = "multimodal",
        teacher_weights: str | Path | None = None,
        teacher_image_size: int | None = None,
        teacher_text: str | nn.Module | None = None,
        teacher_text_weights: str | Path | None = None,
        **student_options,
    ):
        super().__init__()
        if student is None:
            student = TransVG(**student_options)
        elif student_options:
            raise ConfigError(
                f"EpmVG-R: student options {sorted(student_options)} build a TransVG; expected none with student="
            )
        if not isinstance(student, TransVG):
            raise ConfigError(f"EpmVG-R student is a {type(student).__name__}; expected a TransVG")
        self.student = student
        dim = student.head.reg_token.embedding_dim
        teacher = build_teacher(
            teacher,
            teacher_kind,
            weights=teacher_weights,
            image_size=teacher_image_size,
            text=teacher_text,
            text_weights=teacher_text_weights,
        )
        shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
        if shared:
            raise ConfigError(
                f"EpmVG-R: the teacher shares {len(shared)} parameter tensors with the student (the same backbone "
                "object?); freezing the teacher would freeze them in the student: pass a copy (copy.deepcopy)"
            )
        self.projections = nn.ModuleDict(
            {name: projection_head(dim, teacher.embed_dim) for name in ("image", "text", "region")}
        )
        self.teacher = teacher
        self.register_buffer("distillation_calls", torch.zeros((), dtype=torch.long))

    @property
    def transform(self):
        return self.student.transform

    @property
    def image_size(self) -> int:
        return self.student.image_size

    def remember_frozen_backbones(self, memo: BackboneMemo | None) -> None:
        """The student's frozen backbones answer from `memo` (`TransVG.remember_frozen_backbones`); the teacher's
        embeddings are remembered by the criterion (`EpmVGRCriterion(cache=True)`)."""
        self.student.remember_frozen_backbones(memo)

    def forward(self, images: torch.Tensor, texts: list[str] | TokenBatch, valid: torch.Tensor | None = None) -> Output:
        """images (B, 3, S, S) through `transform`; texts: B strings; valid (B, S, S) bool (True on image pixels)."""
        output = self.student(images, texts, valid)
        if not self.training:
            return output
        output.aux.update({f"{name}_embedding": value for name, value in self.embed(output.aux).items()})
        return output

    def embed(self, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's aux (as its Output gives it, in either mode) -> {"image", "text", "region"}: the pooled
        visual tokens, pooled text tokens and [REG] output through their projections, L2-normalised, (B, De) each."""
        pooled = {
            "image": masked_mean(aux["visual_tokens"], aux["visual_mask"]),  # (B, dim)
            "text": masked_mean(aux["text_tokens"], aux["text_mask"]),  # (B, dim)
            "region": aux["reg"],  # (B, dim)
        }
        return {name: F.normalize(self.projections[name](feature), dim=-1) for name, feature in pooled.items()}

    def inference_parameters(self) -> int:
        """Parameters used at inference: the student's (the projections and teacher are training-only)."""
        return sum(p.numel() for p in self.student.parameters())

    def teacher_images(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) images in the student's normalisation -> (B, 3, St, St) in the teacher's normalisation and at
        its input size (bilinear, antialiased). With `valid` (B, S, S), padding is 0 in the teacher's normalisation,
        as it is in the student's."""
        x = self._renormalised(images, valid)
        size = self.teacher.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def teacher_crops(
        self, images: torch.Tensor, boxes_cxcywh: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The box of each image, (B, 4) cxcywh normalised by S, cut from the image in the teacher's normalisation
        and resampled to the teacher's input size: (B, 3, St, St) (roi_align: bilinear, averaging when shrinking)."""
        x = self._renormalised(images, valid)
        boxes_xyxy = cxcywh_to_xyxy(boxes_cxcywh.to(x.dtype)) * x.shape[-1]  # (B, 4) pixels
        rois = torch.cat([torch.arange(len(x), device=x.device, dtype=x.dtype)[:, None], boxes_xyxy], dim=1)
        size = self.teacher.image_size
        return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def _renormalised(self, images: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        def stats(values) -> torch.Tensor:
            return torch.tensor(values, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)

        transform = self.student.transform
        pixels = images * stats(transform.std) + stats(transform.mean)  # back to [0, 1] pixels
        x = (pixels - stats(self.teacher.mean)) / stats(self.teacher.std)
        return x if valid is None else x * valid[:, None].to(x.dtype)


# --- Registered configurations --------------------------------------------------------------------------------------

_TEACHER_OPTIONS = ("teacher_kind", "teacher_weights", "teacher_image_size", "teacher_text", "teacher_text_weights")


def _registered(student_factory, default_teacher: str, options: dict) -> EpmVGR:
    """Split a registered name's overrides: student_module / teacher_module (built modules), the teacher's options,
    and the rest, which go to the student's factory."""
    student_module = options.pop("student_module", None)
    teacher_module = options.pop("teacher_module", None)
    teacher = options.pop("teacher", default_teacher)
    teacher_options = {k: options.pop(k) for k in _TEACHER_OPTIONS if k in options}
    if student_module is not None and options:
        raise ConfigError(
            f"EpmVG-R: student overrides {sorted(options)} build the student; expected none with student_module"
        )
    student = student_module if student_module is not None else student_factory(**options)
    return EpmVGR(student, teacher_module if teacher_module is not None else teacher, **teacher_options)


@register("epmvg-r-tiny")
def epmvg_r_tiny(**overrides) -> EpmVGR:
    """EpmVG-R (reconstruction) for the tiny/study profiles: the student is transvg-tiny (overrides go to it), the
    teacher clip:tiny (random weights unless teacher_weights; or teacher_module=zoo.pretrained("clip-tiny")). The
    unimodal control: teacher_kind="unimodal", teacher="dinov2:tiny" (or a module), teacher_text="bert:minilm"."""
    return _registered(transvg_tiny, "clip:tiny", dict(overrides))


@register("epmvg-r-r50")
def epmvg_r_r50(**overrides) -> EpmVGR:
    """EpmVG-R (reconstruction) at paper scale: the student is transvg-r50 (overrides go to it), the teacher CLIP
    ViT-B/16 at 224 px, random weights unless teacher_weights (OpenAI's file: teacher="clip:ViT-B-16-quickgelu")."""
    return _registered(transvg_r50, "clip:ViT-B-16", dict(overrides))
