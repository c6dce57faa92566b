"""EpmVG-R (reconstruction): the model equals TransVG at inference, the teacher stays frozen, and each distillation
term has its minimum where the student matches the teacher, sends gradients only to the student, and can be switched
off, warmed up and cached."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vgstudy.data.synthref import SynthRef
from vgstudy.data.transforms import GroundingTransform, TransformedDataset, collate
from vgstudy.errors import ConfigError
from vgstudy.losses import BoxCriterion
from vgstudy.losses_epmvg import DISTILLATION_TERMS, EpmVGRCriterion, relation_distillation
from vgstudy.models import build, build_backbone, describe, model_names
from vgstudy.models.base import Output
from vgstudy.models.epmvg import LR_SCALE, EpmVGR, UnimodalTeacher
from vgstudy.models.transvg import TransVG
from vgstudy.train import Stage, TrainConfig, Trainer

# A small student (ResNet-18 to layer3 + one DETR layer, CLIP-tiny's text tower, one fusion layer of width 32) and
# the clip:tiny teacher at 64 px (4 x 4 patches), so its inputs are resized from the student's 128 px.
STUDENT = dict(
    visual="resnet18+detr:tiny",
    text="clip:tiny",
    dim=32,
    depth=1,
    heads=2,
    ffn_dim=64,
    dropout=0.0,
    visual_options={"return_layer": "layer3", "depth": 1},
)
TEACHER_SIZE = 64
ALL_ON = dict(feature=1.0, relation=1.0, contrastive=1.0, region=1.0)


@pytest.fixture(scope="module")
def parts() -> tuple[TransVG, torch.nn.Module]:
    torch.manual_seed(0)
    return TransVG(**STUDENT), build_backbone("clip:tiny", image_size=TEACHER_SIZE)


def make_model(parts, **options) -> EpmVGR:
    student, teacher = parts
    return EpmVGR(copy.deepcopy(student), copy.deepcopy(teacher), **options)


@pytest.fixture
def model(parts) -> EpmVGR:
    return make_model(parts).train()


@pytest.fixture(scope="module")
def batch(parts) -> dict:
    data = TransformedDataset(SynthRef("train", 4, seed=3), GroundingTransform(parts[0].transform))
    return collate([data[i] for i in range(4)])


def forward(model: EpmVGR, batch: dict) -> Output:
    return model(batch["images"], batch["texts"])


# --- The model ------------------------------------------------------------------------------------------------------


def test_names_are_registered():
    assert {"epmvg-r-tiny", "epmvg-r-r50"} <= set(model_names())


def test_train_mode_adds_unit_norm_embeddings_in_the_teacher_space_and_eval_mode_none(model, batch):
    out = forward(model, batch)
    assert out.boxes.shape == (4, 4)
    for key in ("image_embedding", "text_embedding", "region_embedding"):
        assert out.aux[key].shape == (4, model.teacher.embed_dim) == (4, 128)
        torch.testing.assert_close(out.aux[key].norm(dim=-1), torch.ones(4))
    # the pooled visual tokens: all 8 x 8 tokens here (no padding mask given)
    pooled = out.aux["visual_tokens"].mean(dim=1)
    torch.testing.assert_close(out.aux["image_embedding"], F.normalize(model.projections["image"](pooled), dim=-1))
    with torch.no_grad():
        out = forward(model.eval(), batch)
    assert set(out.aux) == {"reg", "visual_tokens", "text_tokens", "visual_mask", "text_mask"}


def test_eval_output_and_flops_equal_a_plain_transvg_with_the_same_weights(model, batch):
    torch.manual_seed(1)
    plain = TransVG(**STUDENT)
    plain.load_state_dict(model.student.state_dict())
    model.eval(), plain.eval()
    flops = []
    for net in (model, plain):
        with FlopCounterMode(display=False) as counter:
            boxes = net(batch["images"], batch["texts"], batch["valid"]).boxes
        flops.append(counter.get_total_flops())
        if net is model:
            expected = boxes
    assert torch.equal(expected, boxes)
    assert flops[0] == flops[1] > 0
    # training adds the projections (the teacher runs in the criterion)
    with FlopCounterMode(display=False) as counter:
        forward(model.train(), batch)
    assert counter.get_total_flops() > flops[0]


def test_the_teacher_is_frozen_counted_apart_and_in_the_state_dict(model, parts):
    model.train()
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not any(m.training for m in model.teacher.modules())
    assert model.student.training and model.projections.training
    parts_counted = describe(model)["parts"]
    student_count = sum(p.numel() for p in parts[0].parameters())
    assert model.inference_parameters() == parts_counted["student"]["total"] == student_count
    assert parts_counted["teacher"] == {"total": sum(p.numel() for p in parts[1].parameters()), "trainable": 0}
    width, embed = 32, 128  # the projections: Linear(32, 32), GELU, Linear(32, 128), for image, text and region
    assert parts_counted["projections"]["trainable"] == 3 * (width * width + width + width * embed + embed)
    state = model.state_dict()
    assert any(key.startswith("teacher.clip.visual.") for key in state) and "distillation_calls" in state


def test_teacher_images_change_normalisation_and_size(model):
    transform, teacher = model.transform, model.teacher
    pixel = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    student_mean, student_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (transform.mean, transform.std))
    images = ((pixel - student_mean) / student_std).expand(2, 3, 128, 128)
    valid = torch.ones(2, 128, 128, dtype=torch.bool)
    valid[1, 96:] = False  # padding at the bottom of image 1
    x = model.teacher_images(images, valid)
    assert x.shape == (2, 3, TEACHER_SIZE, TEACHER_SIZE)
    expected = (pixel - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x[0], expected[0].expand(3, TEACHER_SIZE, TEACHER_SIZE))
    torch.testing.assert_close(x[1, :, :40], expected[0].expand(3, 40, TEACHER_SIZE))  # image rows
    assert x[1, :, 50:].abs().max() < 1e-6  # padding rows: 0, as in the student's normalisation


def test_teacher_crops_cut_the_ground_truth_box(model):
    coarse = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = F.interpolate(coarse, size=(128, 128), mode="bicubic", align_corners=False)  # smooth: resampling agrees
    # a 64 px box at (32, 16): resampled to 64 px, one sample per pixel centre, the pixels themselves
    boxes_cxcywh = torch.tensor([[64.0, 48.0, 64.0, 64.0], [64.0, 64.0, 128.0, 128.0]]) / 128
    crops = model.teacher_crops(images, boxes_cxcywh)
    renormalised = model.teacher_images(images)  # resized to 64 px: the whole-image box is this
    whole = model.teacher_crops(images, boxes_cxcywh[1:].expand(2, 4))
    assert crops.shape == (2, 3, TEACHER_SIZE, TEACHER_SIZE)
    x = model._renormalised(images, None)
    torch.testing.assert_close(crops[0], x[0, :, 16:80, 32:96])
    torch.testing.assert_close(whole, renormalised, atol=0.05, rtol=0)  # 2 x 2 averaging vs an antialiased resize


def test_a_unimodal_teacher_pools_each_backbone_into_one_space_without_learning(parts, batch):
    clip = copy.deepcopy(parts[1])
    teacher = UnimodalTeacher(clip.visual, clip.text)  # 192-wide images, 128-wide texts
    assert teacher.kind == "unimodal" and teacher.embed_dim == 192 and teacher.temperature() == 0.07
    texts = batch["texts"]
    with torch.no_grad():
        embedded = teacher.encode_text(texts)  # (B, 192)
        out = clip.text(texts)
        pooled = (out.tokens * out.mask[..., None]).sum(1) / out.mask.sum(1, keepdim=True)  # (B, 128)
        image = teacher.encode_image(torch.randn(2, 3, TEACHER_SIZE, TEACHER_SIZE))
    assert embedded.shape == (4, 192) and image.shape == (2, 192)
    # orthonormal columns: the texts' cosine similarities are the text backbone's own
    torch.testing.assert_close(embedded @ embedded.t(), F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).t())
    model = EpmVGR(copy.deepcopy(parts[0]), clip.visual, teacher_kind="unimodal", teacher_text=clip.text).train()
    assert model.projections["region"][-1].out_features == 192
    terms = EpmVGRCriterion(model, **ALL_ON)(forward(model, batch), batch)
    assert all(math.isfinite(terms[name].item()) for name in DISTILLATION_TERMS)


# --- The losses -----------------------------------------------------------------------------------------------------


def test_each_term_is_minimal_where_the_student_matches_the_teacher(model, batch):
    criterion = EpmVGRCriterion(model, feature=1.0, relation=1.0, region=1.0)
    out = forward(model, batch)
    teacher = criterion.teacher_embeddings(batch)
    mismatched = criterion(out, batch)
    assert mismatched["feature"] > 0.1 and mismatched["relation"] > 0 and mismatched["region"] > 0.1
    out.aux["image_embedding"], out.aux["text_embedding"] = teacher["image"], teacher["text"]
    # D4's minimum: the unit bisector of the crop's and the text's embeddings, 1 - cos(half the angle)
    out.aux["region_embedding"] = F.normalize(teacher["region"] + teacher["text"], dim=-1)
    matched = criterion(out, batch)
    assert abs(float(matched["feature"])) < 1e-6 and abs(float(matched["relation"])) < 1e-6
    cosines = (teacher["region"] * teacher["text"]).sum(-1)
    torch.testing.assert_close(matched["region"], (1 - ((1 + cosines) / 2).sqrt()).mean())
    out.aux["region_embedding"] = teacher["region"]  # the crop's embedding alone is further from the text
    assert criterion(out, batch)["region"] > matched["region"]


def test_the_contrastive_term_vanishes_for_separated_matching_pairs_and_is_log_b_for_identical_ones(model, batch):
    criterion = EpmVGRCriterion(model, feature=0, relation=0, region=0, contrastive=1.0, temperature=0.01)
    out = forward(model, batch)
    out.aux["image_embedding"] = out.aux["text_embedding"] = torch.eye(4, 128)  # pair i alone at e_i
    assert float(criterion(out, batch)["contrastive"]) < 1e-6
    out.aux["image_embedding"] = out.aux["text_embedding"] = F.normalize(torch.ones(4, 128), dim=-1)
    assert float(criterion(out, batch)["contrastive"]) == pytest.approx(math.log(4), rel=1e-5)


def test_the_relation_term_is_invariant_to_the_batch_order(model, batch):
    criterion = EpmVGRCriterion(model, feature=0, relation=1.0, region=0)
    out = forward(model, batch)
    order = torch.tensor([2, 0, 3, 1])
    shuffled_out = Output(out.boxes[order], {key: value[order] for key, value in out.aux.items()})
    shuffled = {
        key: value[order] if torch.is_tensor(value) else [value[i] for i in order] for key, value in batch.items()
    }
    straight, permuted = criterion(out, batch)["relation"], criterion(shuffled_out, shuffled)["relation"]
    assert straight > 0
    torch.testing.assert_close(permuted, straight)
    # the same holds for any embeddings, while moving the texts against the images changes it
    images, texts = (
        F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(s)), dim=-1) for s in (1, 2)
    )
    teacher_images, teacher_texts = F.normalize(images + 0.5 * torch.randn(5, 16), dim=-1), texts.roll(1, 0)
    value = relation_distillation(images, texts, teacher_images, teacher_texts, 0.1)
    p = torch.randperm(5)
    torch.testing.assert_close(
        relation_distillation(images[p], texts[p], teacher_images[p], teacher_texts[p], 0.1), value
    )
    assert not torch.allclose(
        relation_distillation(images, texts.roll(1, 0), teacher_images, teacher_texts, 0.1), value
    )


@pytest.mark.parametrize("term", DISTILLATION_TERMS)
def test_each_term_alone_trains_the_student_and_projections_never_the_teacher(parts, batch, term):
    model = make_model(parts).train()
    criterion = EpmVGRCriterion(model, **{name: float(name == term) for name in DISTILLATION_TERMS})
    terms = criterion(forward(model, batch), batch)
    assert set(terms) == {"loss", "l1", "giou", term}
    terms[term].backward()
    assert all(p.grad is None for p in model.teacher.parameters())

    def moved(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    projected = {"region"} if term == "region" else {"image", "text"}
    for name, projection in model.projections.items():
        assert moved(projection) == (name in projected), name
    student = model.student
    if term == "region":
        assert moved(student.head) and moved(student.visual) and moved(student.text)  # through the fusion
    else:
        assert moved(student.visual) and moved(student.text) and moved(student.visual_proj)
        assert not moved(student.head)  # the image and text terms read the tokens before the fusion


def test_the_warm_up_ramps_the_distillation_weights_over_training_calls(model, batch):
    criterion = EpmVGRCriterion(model, feature=2.0, relation=0, region=0, warmup_steps=4)
    out = forward(model, batch)
    ramp = []
    for _ in range(6):
        terms = criterion(out, batch)
        ramp.append(((terms["loss"] - terms["l1"] - terms["giou"]) / (2.0 * terms["feature"])).item())
    assert ramp == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-5)
    model.eval()
    criterion(out, batch)  # eval-mode calls do not advance the ramp
    assert int(model.distillation_calls) == 6
    # the position is in the model's state: a model loading it resumes the ramp
    resumed = make_model((model.student, model.teacher.clip))
    resumed.load_state_dict(model.state_dict())
    assert EpmVGRCriterion(resumed, warmup_steps=12).distillation_scale == 0.5


def test_a_zero_weight_switches_a_term_off_and_no_distillation_never_runs_the_teacher(model, batch, monkeypatch):
    out = forward(model, batch)
    terms = EpmVGRCriterion(model, feature=0.5, relation=0, region=0)(out, batch)
    assert set(terms) == {"loss", "l1", "giou", "feature"}
    torch.testing.assert_close(terms["loss"], terms["l1"] + terms["giou"] + 0.5 * terms["feature"])

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(model.teacher, "encode_image", refuse)
    monkeypatch.setattr(model.teacher, "encode_text", refuse)
    none = EpmVGRCriterion(model, feature=0, relation=0, region=0)(out, batch)
    assert set(none) == {"loss", "l1", "giou"}
    torch.testing.assert_close(none["loss"], BoxCriterion()(out, batch)["loss"])
    assert "contrastive" in EpmVGRCriterion(model, feature=0, relation=0, region=0, contrastive=1.0)(out, batch)


def test_the_cache_serves_a_repeated_batch_with_the_same_embeddings(model, batch, monkeypatch):
    calls = []
    encode_image = model.teacher.encode_image
    monkeypatch.setattr(model.teacher, "encode_image", lambda images: calls.append(len(images)) or encode_image(images))
    cached = EpmVGRCriterion(model, cache=True)
    first = cached.teacher_embeddings(batch)
    assert (cached.cache_hits, cached.cache_misses, calls) == (0, 4, [4, 4])  # the images and the crops
    again = cached.teacher_embeddings(batch)
    assert (cached.cache_hits, cached.cache_misses, calls) == (4, 4, [4, 4])
    uncached = EpmVGRCriterion(model).teacher_embeddings(batch)
    for name in ("image", "text", "region"):
        assert torch.equal(again[name], first[name])
        torch.testing.assert_close(first[name], uncached[name])
    # a sample without a source is never cached; a new text of a cached image is a new sample
    partly = {**batch, "sources": ["", *batch["sources"][1:]], "texts": ["a new text", *batch["texts"][1:]]}
    cached.teacher_embeddings(partly)
    assert (cached.cache_hits, cached.cache_misses) == (7, 5)
    cached.teacher_embeddings(partly)
    assert (cached.cache_hits, cached.cache_misses) == (10, 6)


# --- Bad input ------------------------------------------------------------------------------------------------------


def test_bad_configurations_are_config_errors(parts, model, batch):
    student, clip = parts
    with pytest.raises(ConfigError, match="teacher_kind"):
        make_model(parts, teacher_kind="bimodal")
    with pytest.raises(ConfigError, match="expected a CLIPBackbone"):
        EpmVGR(copy.deepcopy(student), copy.deepcopy(student.visual))  # a vision-only backbone as the CLIP
    with pytest.raises(ConfigError, match="a whole CLIP is the multimodal teacher"):
        make_model(parts, teacher_kind="unimodal", teacher_text="bert:minilm")
    with pytest.raises(ConfigError, match="teacher_text"):
        EpmVGR(copy.deepcopy(student), copy.deepcopy(clip.visual), teacher_kind="unimodal")
    shared = copy.deepcopy(clip)
    with pytest.raises(ConfigError, match="shares"):  # a student built on the teacher's own text tower
        EpmVGR(TransVG(**{**STUDENT, "text": "unused", "text_module": shared}), shared)
    with pytest.raises(ConfigError, match="student options"):
        EpmVGR(copy.deepcopy(student), copy.deepcopy(clip), dim=64)
    with pytest.raises(ConfigError, match="expected none with student_module"):
        build("epmvg-r-tiny", student_module=copy.deepcopy(student), teacher_module=copy.deepcopy(clip), dim=64)
    for bad in ({"relation": -1.0}, {"feature": float("nan")}, {"region": True}, {"warmup_steps": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EpmVGRCriterion(model, **bad)
    with pytest.raises(ConfigError, match="temperature"):
        EpmVGRCriterion(model, temperature=0.0)
    with pytest.raises(ConfigError, match="expected the EpmVGR"):
        EpmVGRCriterion(student)
    with torch.no_grad():
        out = forward(model.eval(), batch)
    with pytest.raises(ConfigError, match="train mode"):
        EpmVGRCriterion(model)(out, batch)


# --- Registered names and training ----------------------------------------------------------------------------------


def test_epmvg_r_tiny_builds_transvg_tiny_as_its_student(parts):
    model = build("epmvg-r-tiny", dim=32, depth=1, heads=2, ffn_dim=64, teacher_module=copy.deepcopy(parts[1]))
    reference = build("transvg-tiny", dim=32, depth=1, heads=2, ffn_dim=64)
    assert isinstance(model, EpmVGR) and model.teacher.kind == "multimodal"
    assert model.state_dict().keys() >= {f"student.{key}" for key in reference.state_dict()}
    assert model.inference_parameters() == describe(reference)["total"]


@pytest.mark.slow
def test_epmvg_r_r50_costs_transvg_r50_at_inference():
    model = build("epmvg-r-r50")
    assert model.teacher.embed_dim == 512 and model.teacher.image_size == 224
    assert model.inference_parameters() == describe(build("transvg-r50"))["total"]


def test_two_trainer_steps_with_every_term(parts, tmp_path):
    model = make_model(parts)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    train_set = TransformedDataset(SynthRef("train", 8, seed=0), GroundingTransform(model.transform))  # no augmentation
    criterion = EpmVGRCriterion(model, **ALL_ON, warmup_steps=1, cache=True)
    stage = Stage("train", epochs=1, lr=1e-4, lr_scale=LR_SCALE)
    config = TrainConfig(stages=(stage,), batch_size=4, eval_every_epochs=0, log_every_steps=1, amp="off")
    Trainer(model, criterion, train_set, config, tmp_path, collate_fn=collate).fit(resume=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [record for record in records if record["kind"] == "train"]
    assert len(train) == 2
    assert all(math.isfinite(record[name]) for record in train for name in ("loss", *DISTILLATION_TERMS))
    assert train[0]["loss"] == pytest.approx(train[0]["l1"] + train[0]["giou"], rel=1e-5)  # warm-up: r = 0 first
    assert int(model.distillation_calls) == 2 and criterion.cache_misses == 8
    assert all(torch.equal(value, model.teacher.state_dict()[key]) for key, value in teacher_before.items())
