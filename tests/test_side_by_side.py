"""benchmarks/side_by_side.py: arguments, the exchange files, the stage hooks, agreement and the report, without the
releases; and, with HIVG_RELEASE / TRANSVG_RELEASE set (checkouts of linhuixiao/HiVG, djiajunustc/TransVG), the
narrow size run against each.

Speed is never asserted; these tests check that the figures are computed, compared and reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from vgstudy.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "side_by_side.py"


def load_script():
    spec = importlib.util.spec_from_file_location("side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sbs = load_script()
HIVG, TRANSVG = sbs.METHODS["hivg"], sbs.METHODS["transvg"]
NARROW = HIVG.sizes["narrow"]
# The benchmark's layout (12 + 12 blocks, 77 tokens) at the smallest widths, for vgstudy's side in fast tests.
MICRO = sbs.HiVGSize("micro", image_size=96, vision_width=64, vision_heads=1, text_width=32, text_heads=1, embed_dim=32,
                 head_depth=1, head_heads=1, head_ffn=64)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors on 2 shared cores: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_checkout(folder: Path, method: str) -> Path:
    """`folder` holding the files a checkout of `method`'s release must have (empty: only the argument checks look
    at them)."""
    for name in sbs.METHODS[method].release_files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    return folder


@pytest.fixture
def fake_release(tmp_path):
    return fake_checkout(tmp_path, "hivg")


# --- Arguments -------------------------------------------------------------------------------------------------------


def test_the_release_comes_from_the_option_or_the_environment(fake_release, monkeypatch):
    monkeypatch.delenv("HIVG_RELEASE", raising=False)
    with pytest.raises(ConfigError, match="set HIVG_RELEASE to a checkout of linhuixiao/HiVG"):
        sbs.parse_arguments(["hivg"])
    assert sbs.parse_arguments(["hivg", "--release", str(fake_release)]).release == fake_release.resolve()
    monkeypatch.setenv("HIVG_RELEASE", str(fake_release))
    args = sbs.parse_arguments(["hivg"])
    assert args.release == fake_release.resolve() and args.python == sys.executable and args.sizes == ("b",)


def test_a_folder_that_is_not_the_release_is_named_with_what_it_lacks(fake_release):
    (fake_release / "hivg_train.py").unlink()
    with pytest.raises(ConfigError, match=r"not a HiVG checkout \(missing hivg_train\.py\)"):
        sbs.parse_arguments(["hivg", "--release", str(fake_release)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], r"method None: expected one of hivg, transvg, mapper"),
        (["epmvg"], r"method 'epmvg': expected one of hivg, transvg, mapper"),
        (["hivg", "--sizes", "r50"], r"--sizes 'r50': expected hivg sizes from \['b', 'narrow'\]"),
        (["hivg", "--steps", "0"], r"--steps 0: expected at least 1"),
        (["hivg", "--batch", "0"], r"--batch 0: expected at least 1"),
        (["hivg", "--threads", "0"], r"--threads 0: expected at least 1"),
        (["hivg", "--stage", "stage9"], r"--stage 'stage9': expected one of warmup, stage1, stage2, stage3"),
        (["hivg", "--python", "/no/such/python"], r"--python /no/such/python: not an executable file"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_expected(fake_release, argv, message):
    with pytest.raises(ConfigError, match=message):
        sbs.parse_arguments([*argv, "--release", str(fake_release)])


def test_sizes_are_parsed_and_checked():
    assert sbs.parse_sizes("narrow, b,narrow", HIVG) == ("narrow", "b")
    assert sbs.parse_sizes("narrow,r50", TRANSVG) == ("narrow", "r50")
    for bad in ("", "l", "b,huge"):
        with pytest.raises(ConfigError, match="--sizes"):
            sbs.parse_sizes(bad, HIVG)
    with pytest.raises(ConfigError, match=r"expected transvg sizes from \['narrow', 'r50'\]"):
        sbs.parse_sizes("b", TRANSVG)


def test_sizes_describe_the_same_clip_to_both_libraries():
    for size in HIVG.sizes.values():
        hf, oc = size.clip_config(), size.open_clip_config()
        assert hf["vision_config"]["hidden_size"] == oc["vision_cfg"]["width"]
        assert hf["vision_config"]["num_attention_heads"] * oc["vision_cfg"]["head_width"] == size.vision_width
        assert hf["text_config"]["num_attention_heads"] == oc["text_cfg"]["heads"]
        assert hf["text_config"]["max_position_embeddings"] == oc["text_cfg"]["context_length"] == 77
        assert hf["projection_dim"] == oc["embed_dim"] == size.embed_dim
        release = size.release_arguments("stage2")
        assert release[release.index("--hi_lora_stage") + 1] == "2"
        assert release[release.index("--vl_hidden_dim") + 1] == str(size.embed_dim)


# --- Exchange files --------------------------------------------------------------------------------------------------


def test_a_batch_round_trips_through_its_file(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[0, :8] = False
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.1, 0.9, 0.05, 0.1]])
    texts = ["the red circle", "das grüne Dreieck, links"]
    sbs.write_batch(tmp_path / "batch.safetensors", images, valid, boxes, texts)
    batch = sbs.read_batch(tmp_path / "batch.safetensors")
    assert torch.equal(batch["images"], images) and torch.equal(batch["valid"], valid)
    assert torch.equal(batch["boxes_cxcywh"], boxes) and batch["texts"] == texts and batch["valid"].dtype == torch.bool


def test_weights_round_trip_even_when_views_share_memory(tmp_path):
    weight = torch.randn(6, 4)
    tensors = {"transposed": weight.t(), "row": weight[2], "ids": torch.arange(5)[None].expand(2, -1)}
    sbs.write_tensors(tmp_path / "w.safetensors", tensors, {"kind": "release state dict"})
    read, meta = sbs.read_tensors(tmp_path / "w.safetensors")
    assert meta == {"kind": "release state dict"}
    assert all(torch.equal(read[key], value) for key, value in tensors.items())


def test_files_that_are_not_the_benchmarks_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(sbs.SideBySideError, match="without the 'side_by_side' metadata"):
        sbs.read_tensors(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("not tensors")
    with pytest.raises(sbs.SideBySideError, match="text.safetensors: not a readable safetensors file"):
        sbs.read_tensors(tmp_path / "text.safetensors")
    sbs.write_tensors(tmp_path / "outputs.safetensors", {"x": torch.zeros(1)}, {"kind": "outputs"})
    with pytest.raises(sbs.SideBySideError, match="not an input batch"):
        sbs.read_batch(tmp_path / "outputs.safetensors")


def test_a_malformed_batch_is_named_before_it_is_written(tmp_path):
    images, valid, boxes = torch.zeros(2, 3, 16, 16), torch.ones(2, 16, 16, dtype=torch.bool), torch.zeros(2, 4)
    with pytest.raises(sbs.SideBySideError, match=r"texts \['one'\], expected a list of 2 strings"):
        sbs.write_batch(tmp_path / "b.safetensors", images, valid, boxes, ["one"])
    with pytest.raises(sbs.SideBySideError, match=r"valid of shape \(2, 16, 16\) torch.float32"):
        sbs.write_batch(tmp_path / "b.safetensors", images, valid.float(), boxes, ["a", "b"])
    with pytest.raises(sbs.SideBySideError, match=r"images of shape \(2, 3, 16, 8\)"):
        sbs.write_batch(tmp_path / "b.safetensors", images[..., :8], valid, boxes, ["a", "b"])
    assert not (tmp_path / "b.safetensors").exists()


# --- vgstudy's side: stage hooks and the release's padding rule -----------------------------------------------------


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    """vgstudy's HiVG at the micro size (random weights), as the benchmark builds it."""
    from vgstudy.models import build

    backbone = sbs._register_open_clip(MICRO, tmp_path_factory.mktemp("open_clip"))
    torch.manual_seed(0)
    model = build(
        "hivg-b",
        backbone=backbone,
        head_depth=MICRO.head_depth,
        head_heads=MICRO.head_heads,
        head_ffn_dim=MICRO.head_ffn,
        text_layout="official",
        hilora_merge=False,
    )
    model.enter_stage("stage3")
    return model.eval()


def test_every_stage_is_caught_on_vgstudys_side_in_forward_order(micro_model):
    size = MICRO.image_size
    caught: dict[str, torch.Tensor] = {}
    with torch.no_grad(), sbs.caught_stages(micro_model, "ours", HIVG, MICRO, caught):
        micro_model(torch.randn(1, 3, size, size), ["the small red circle"])
    assert list(caught) == HIVG.stage_names(MICRO)  # dicts keep the order the hooks fired in
    tokens = 1 + (size // MICRO.patch) ** 2
    assert caught["vision.0.attention"].shape == (1, tokens, MICRO.vision_width)
    assert caught["bridge.3"].shape == (1, tokens, MICRO.vision_width)
    assert caught["text.final_norm"].shape == (1, 77, MICRO.text_width)
    assert caught["head"].shape == (1, 1 + tokens + 77, MICRO.embed_dim)
    assert not any(module._forward_hooks for module in micro_model.modules())  # removed afterwards


def test_a_stage_without_its_module_is_an_error():
    with pytest.raises(sbs.SideBySideError, match="no module 'clip.text.ln_final'"):
        with sbs.caught_stages(torch.nn.Linear(2, 2), "ours", HIVG, NARROW, {}):
            pass


def test_release_module_names_are_read_through_pefts_wraps():
    wrapped = "clip.base_model.model.base_model.model.vision_model.encoder.layers.3.cross_mlp"
    assert sbs.without_peft_wraps(wrapped) == HIVG.stage_module("bridge.3", "release")
    assert HIVG.stage_module("vision.7.attention", "release") == "clip.vision_model.encoder.layers.7.self_attn"
    assert HIVG.stage_module("vision.7.mlp", "ours") == "clip.visual.transformer.resblocks.7.mlp"


def test_hivg_masks_the_patches_the_releases_resize_masks(micro_model):
    """The release resizes the padding mask with torchvision's Resize (a bool tensor: bilinear, antialiased, cast
    back to bool); a letterbox edge half-way through a patch row masks the rows on both sides alike."""
    from torchvision.transforms import Resize

    size, grid = MICRO.image_size, MICRO.image_size // MICRO.patch
    valid = torch.ones(3, size, size, dtype=torch.bool)
    valid[0, :24], valid[0, -24:] = False, False  # 1.5 patches top and bottom
    valid[1, :, 70:] = False
    generator = torch.Generator().manual_seed(0)
    valid[2] = torch.rand(size, size, generator=generator) > 0.01
    expected = Resize([grid, grid])(~valid).flatten(1)  # the release's get_masks
    got = micro_model._visual_padding(torch.zeros(3, 3, size, size), valid)
    assert got.dtype == torch.bool and not got[:, 0].any()  # CLS is never padding
    assert torch.equal(got[:, 1:], expected)
    rows = got[0, 1:].view(grid, grid).all(dim=1)
    assert rows.tolist() == rows.flip(0).tolist()  # symmetric


# --- TransVG: the release's checkout, stages on both sides, the report ---------------------------------------------

# TransVG's layout (ResNet-50, BERT of width 768) at the least depth and width, for vgstudy's side in fast tests.
TRANSVG_MICRO = sbs.TransVGSize("micro", image_size=64, detr_width=32, detr_depth=1, detr_heads=2, detr_ffn=64,
                                bert_depth=1, bert_ffn=64, fusion_width=32, fusion_depth=2, fusion_heads=2,
                                fusion_ffn=64)  # fmt: skip


@pytest.fixture
def fake_transvg_release(tmp_path):
    return fake_checkout(tmp_path, "transvg")


def test_transvgs_release_comes_from_its_own_variable_and_its_paper_size_is_the_default(
    fake_transvg_release, monkeypatch
):
    monkeypatch.delenv("TRANSVG_RELEASE", raising=False)
    with pytest.raises(ConfigError, match="set TRANSVG_RELEASE to a checkout of djiajunustc/TransVG"):
        sbs.parse_arguments(["transvg"])
    monkeypatch.setenv("TRANSVG_RELEASE", str(fake_transvg_release))
    args = sbs.parse_arguments(["transvg"])
    assert args.release == fake_transvg_release.resolve() and args.sizes == ("r50",)
    (fake_transvg_release / "datasets" / "data_loader.py").unlink()
    with pytest.raises(ConfigError, match=r"not a TransVG checkout \(missing datasets/data_loader\.py\)"):
        sbs.parse_arguments(["transvg", "--sizes", "narrow"])


def test_transvg_sizes_give_the_release_the_architecture_vgstudy_builds():
    r50 = TRANSVG.sizes["r50"]
    arguments = r50.release_arguments()
    value = {name: arguments[arguments.index(name) + 1] for name in arguments[::2]}
    assert value["--imsize"] == "640" and value["--max_query_len"] == "20" and value["--backbone"] == "resnet50"
    assert value["--bert_enc_num"] == "12" and value["--detr_enc_num"] == value["--enc_layers"] == "6"
    from transformers import BertConfig

    default = BertConfig()
    assert {k: getattr(default, k) for k in r50.bert_config()} == r50.bert_config()  # BERT-base, as the release's
    narrow = TRANSVG.sizes["narrow"]
    assert narrow.bert_config()["hidden_size"] == 768 and narrow.image_size % narrow.stride == 0
    assert narrow.release_arguments()[narrow.release_arguments().index("--bert_enc_num") + 1] == "2"


@pytest.fixture(scope="module")
def transvg_micro():
    torch.manual_seed(0)
    return sbs.transvg_model(TRANSVG_MICRO).eval()


def test_transvg_stages_are_caught_on_vgstudys_side_in_forward_order(transvg_micro):
    caught: dict[str, torch.Tensor] = {}
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[1, 40:] = False
    with torch.no_grad(), sbs.caught_stages(transvg_micro, "ours", TRANSVG, TRANSVG_MICRO, caught):
        transvg_micro(torch.randn(2, 3, 64, 64), ["the red circle", "a blue square"], valid=valid)
    assert list(caught) == TRANSVG.stage_names(TRANSVG_MICRO)
    assert caught["visual.resnet"].shape == (2, 2048, 2, 2)  # stride 32
    assert caught["visual.detr.0"].shape == caught["visual_proj"].shape[:2] + (32,) == (2, 4, 32)
    assert caught["text.bert.0"].shape == (2, 20, 768)
    assert caught["fusion.1"].shape == (2, 1 + 20 + 4, 32)
    assert caught["box_mlp"].shape == (2, 4)


def test_transvg_release_stage_modules_are_in_the_releases_layout(transvg_micro):
    """Every release module a stage names holds weights of the release's state dict (vgstudy.convert.transvg's
    layout), and the DETR-style encoders, run (L, B, C) there, are the ones transposed."""
    from vgstudy.convert.transvg import to_release

    release_keys = list(to_release(transvg_micro))
    for stage in TRANSVG.stage_names(TRANSVG_MICRO):
        module = TRANSVG.stage_module(stage, "release")
        assert any(key.startswith(module + ".") for key in release_keys), (stage, module)
    transposed = [s for s in TRANSVG.stage_names(TRANSVG_MICRO) if TRANSVG.release_sequence_first(s)]
    assert transposed == ["visual.detr.0", "visual_proj", "fusion.0", "fusion.1"]


def test_transvgs_report_compares_boxes_and_names_its_sizes():
    stages = TRANSVG.stage_names(TRANSVG_MICRO)
    release = {f"stage.{stage}": torch.randn(2, 3) for stage in stages}
    release |= {"output.boxes": torch.rand(2, 4), "output.tokens": torch.randint(0, 30522, (2, 20))}
    ours = {key: value.clone() for key, value in release.items()}
    ours["output.boxes"] += 3e-5
    ours["output.tokens"] = ours["output.tokens"][:, :10]  # another length: not equal, and no error
    agreement = {"square": sbs.compare(ours, release, TRANSVG, TRANSVG_MICRO)}
    assert agreement["square"]["boxes_agree"] and not agreement["square"]["tokens_equal"]
    report = fake_report()
    report["method"] = "transvg"
    entry = report["sizes"][0]
    entry.update(size=dataclasses.asdict(TRANSVG_MICRO), description=TRANSVG_MICRO.describe(), agreement=agreement)
    markdown = sbs.render_markdown(report)
    assert markdown.startswith("# TransVG side by side")
    assert "## Size micro: 64 px, resnet50 + DETR encoder 32 x 1 layers, BERT 768 x 1 layers" in markdown
    assert "| input | boxes | token ids equal |" in markdown and "| square | 3.0e-05 | NO | none |" in markdown
    assert "HiLoRA" not in markdown


# --- MaPPER: the release's checkout, sizes, stages on both sides, the report ---------------------------------------

MAPPER = sbs.METHODS["mapper"]


@pytest.fixture
def fake_mapper_release(tmp_path):
    return fake_checkout(tmp_path, "mapper")


def test_mappers_release_comes_from_its_own_variable_and_b_is_the_default(fake_mapper_release, monkeypatch):
    monkeypatch.delenv("MAPPER_RELEASE", raising=False)
    with pytest.raises(ConfigError, match="set MAPPER_RELEASE to a checkout of liuting20/MaPPER"):
        sbs.parse_arguments(["mapper"])
    monkeypatch.setenv("MAPPER_RELEASE", str(fake_mapper_release))
    args = sbs.parse_arguments(["mapper"])
    assert args.release == fake_mapper_release.resolve() and args.sizes == ("b",)
    assert sbs.parse_arguments(["mapper", "--sizes", "narrow,b"]).sizes == ("narrow", "b")
    with pytest.raises(ConfigError, match=r"expected mapper sizes from \['b', 'narrow'\]"):
        sbs.parse_arguments(["mapper", "--sizes", "r50"])
    (fake_mapper_release / "configs" / "med_config.json").unlink()
    with pytest.raises(ConfigError, match=r"not a MaPPER checkout \(missing configs/med_config\.json\)"):
        sbs.parse_arguments(["mapper"])


def test_mapper_sizes_are_what_vgstudy_builds_from_the_releases_arguments():
    """The release fixes all but the fusion; release_overrides of a size's arguments gives vgstudy that fusion."""
    from vgstudy.convert.mapper import release_overrides
    from vgstudy.models.mapper import PAPER_DEPTH, PAPER_POSITIONS, RELEASE_PRIOR_MASK_LEN, MaPPERConfig

    paper = MaPPERConfig()
    for size in MAPPER.sizes.values():
        assert size.adapter_blocks == PAPER_POSITIONS and size.depth == size.prior_depth == PAPER_DEPTH
        assert size.text_len == RELEASE_PRIOR_MASK_LEN and size.image_size == 37 * size.patch
        arguments = size.release_arguments()
        value = {name.removeprefix("--"): arguments[i + 1] for i, name in enumerate(arguments) if i % 2 == 0}
        assert value["device"] == "cpu" and value["dataset"] == "unc"
        numbers = {key: int(text) for key, text in value.items() if text.isdigit()}
        overrides = release_overrides(argparse.Namespace(**numbers))
        assert overrides == {
            "fidelity": "release",
            "max_len": size.text_len,
            "image_size": size.image_size,
            "dim": size.fusion_width,
            "depth": size.fusion_depth,
            "heads": size.fusion_heads,
            "ffn_dim": size.fusion_ffn,
        }
    b = MAPPER.sizes["b"]
    assert (b.fusion_width, b.fusion_depth, b.fusion_heads, b.fusion_ffn) == (
        paper.dim, paper.depth, paper.heads, paper.ffn_dim
    )  # fmt: skip


@pytest.fixture(scope="module")
def mapper_micro():
    """vgstudy's MaPPER with the release's behaviour at the tiny profile (random weights), and its MaPPERSize."""
    from vgstudy.models import build
    from vgstudy.models.mapper import TINY_DEPTH, tiny_config

    torch.manual_seed(0)
    model = build("mapper-tiny", fidelity="release").eval()
    config = tiny_config(show=False)
    size = sbs.MaPPERSize(
        "micro", fusion_width=config["dim"], fusion_depth=config["depth"], fusion_heads=config["heads"],
        fusion_ffn=config["ffn_dim"], image_size=model.image_size, patch=model.visual.patch_size, depth=TINY_DEPTH,
        prior_depth=model.prior.depth, adapter_blocks=config["visual_positions"],
    )  # fmt: skip
    assert config["text_positions"] == config["visual_positions"]
    return model, size


def test_mapper_stages_are_caught_on_vgstudys_side_in_forward_order(mapper_micro):
    model, size = mapper_micro
    caught: dict[str, torch.Tensor] = {}
    s = size.image_size
    valid = torch.ones(2, s, s, dtype=torch.bool)
    valid[1, : s // 4] = False
    with torch.no_grad(), sbs.caught_stages(model, "ours", MAPPER, size, caught):
        model(torch.randn(2, 3, s, s), ["the red circle", "a blue square on the left"], valid=valid)
    assert list(caught) == MAPPER.stage_names(size)  # dicts keep the order the hooks fired in
    tokens = 1 + (s // size.patch) ** 2
    assert caught["prior.0"].shape == (2, 20, model.prior.width)
    assert caught["text.1.dypa"].shape == caught["text.1"].shape == caught["pgt"].shape == (2, 20, model.text.width)
    assert caught["visual.1.loca"].shape == caught["visual.norm"].shape == (2, tokens, model.visual.width)
    assert caught["fusion.0"].shape == (2, 1 + 20 + tokens, size.fusion_width)
    assert caught["box_mlp"].shape == (2, 4)


def test_mapper_release_stage_modules_are_in_the_converters_layout(mapper_micro):
    """Every release module a stage names holds weights of the release's state dict (vgstudy.convert.mapper's key
    layout, as `to_release` writes it); the CLIP blocks and the fusion, run (L, B, C) there, are transposed."""
    from vgstudy.convert.mapper import release_key, to_release

    model, size = mapper_micro
    release_keys = list(to_release(model))
    ours = dict(model.named_modules())
    for stage in MAPPER.stage_names(size):
        module, own = MAPPER.stage_module(stage, "release"), MAPPER.stage_module(stage, "ours")
        assert own in ours, stage
        own_keys = [key for key in model.state_dict() if key.startswith(own + ".")]
        assert own_keys and {release_key(key) for key in own_keys} <= set(release_keys), stage
        assert all(release_key(key).startswith(module + ".") for key in own_keys), (stage, module)
    transposed = [stage for stage in MAPPER.stage_names(size) if MAPPER.release_sequence_first(stage)]
    assert transposed == [*(f"prior.{i}" for i in range(size.prior_depth)), "fusion.0", "fusion.1", "fusion.2"]


def test_mappers_unread_patterns_name_exactly_the_weights_no_forward_reads(mapper_micro):
    """vgstudy's: BERT's pooler, its token-type embedding (the release's BERT has none) and DyPA's unused prior
    projection; the release's are the converter's list."""
    import re

    from vgstudy.convert.mapper import RELEASE_UNUSED, to_release

    model, _ = mapper_micro
    patterns = [re.compile(pattern) for pattern in MAPPER.unread("ours")]
    unread = sorted(name for name, _ in model.named_parameters() if any(p.fullmatch(name) for p in patterns))
    assert "text.embeddings.token_type_embeddings.weight" in unread
    assert all(".pooler." in name or ".prior_down." in name or "token_type" in name for name in unread)
    assert len([name for name in unread if "prior_down" in name]) == 2 * 3  # weight and bias of 3 DyPAs
    assert not any(key.startswith("textmodel.bert.embeddings.token_type") for key in to_release(model))
    assert MAPPER.unread("release") == [pattern.pattern for pattern in RELEASE_UNUSED]
    read_keys = {key for key in to_release(model) if not any(p.fullmatch(key) for p in RELEASE_UNUSED)}
    assert not any("dapt_text.clip_down_proj" in key for key in read_keys)


def test_mappers_report_compares_boxes_and_names_its_size(mapper_micro):
    _, size = mapper_micro
    release = {f"stage.{stage}": torch.randn(2, 3) for stage in MAPPER.stage_names(size)}
    release |= {"output.boxes": torch.rand(2, 4), "output.tokens": torch.randint(0, 30522, (2, 20))}
    ours = {key: value.clone() for key, value in release.items()}
    ours["stage.text.3.dypa"] += 1.0
    ours["stage.text.3"] += 1.0
    agreement = {"letterboxed": sbs.compare(ours, release, MAPPER, size)}
    assert agreement["letterboxed"]["first_divergent_stage"] == "text.3.dypa"
    assert agreement["letterboxed"]["boxes_agree"] and agreement["letterboxed"]["tokens_equal"]
    report = fake_report()
    report["method"] = "mapper"
    entry = report["sizes"][0]
    b = MAPPER.sizes["b"]
    entry.update(size=dataclasses.asdict(b), description=b.describe(), agreement=agreement)
    markdown = sbs.render_markdown(report)
    assert markdown.startswith("# MaPPER side by side")
    assert "## Size b: 518 px, DINOv2-B/14 + LoCA, BERT-base + DyPA, CLIP ViT-B/16 text prior, 20 tokens, fusion " \
        "256 x 6 layers (8 heads, FFN 2048)" in markdown  # fmt: skip
    assert "| letterboxed | 0.0e+00 | yes | text.3.dypa |" in markdown and "| text.3.dypa |" in markdown
    assert "HiLoRA" not in markdown


def test_the_release_saves_its_training_args_beside_its_weights(tmp_path):
    """vgstudy's side rebuilds the model from the args the release worker saves in the weights file's metadata."""
    meta = {"kind": "release state dict", "args": {"max_query_len": 20, "vl_hidden_dim": 64}}
    sbs.write_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(1)}, meta)
    assert sbs.read_tensors(tmp_path / "w.safetensors")[1] == meta
    sbs.write_tensors(tmp_path / "bare.safetensors", {"x": torch.zeros(1)}, {"kind": "release state dict"})
    with pytest.raises(sbs.SideBySideError, match="no release training args in its metadata"):
        sbs.MaPPEROurs(MAPPER.sizes["b"], tmp_path / "bare.safetensors")


# --- Agreement and report --------------------------------------------------------------------------------------------


def fake_outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    outputs = {f"stage.{stage}": torch.randn(2, 5, 3, generator=generator) for stage in HIVG.stage_names(NARROW)}
    for key, shape in {"boxes": (2, 4), "logits_per_text": (2, 2), "patch_text_logits": (2, 49)}.items():
        outputs[f"output.{key}"] = torch.rand(shape, generator=generator)
    outputs["output.mask_logits"] = torch.randn(2, 56, 56, generator=generator)
    outputs["output.tokens"] = torch.randint(0, 49408, (2, 77), generator=generator)
    return outputs


def test_agreement_finds_the_first_stage_that_diverges():
    release = fake_outputs()
    same = sbs.compare({k: v.clone() for k, v in release.items()}, release, HIVG, NARROW)
    assert same["boxes_agree"] and same["tokens_equal"] and same["first_divergent_stage"] is None
    assert all(s["max_abs"] == 0 for s in same["stages"])

    ours = {k: v.clone() for k, v in release.items()}
    ours["stage.bridge.7"] += 1e-2  # and every stage after it, as a real divergence would
    for stage in HIVG.stage_names(NARROW)[HIVG.stage_names(NARROW).index("bridge.7") + 1 :]:
        ours[f"stage.{stage}"] += 1e-2
    ours["output.boxes"] += 2e-4
    ours["output.tokens"][1, 3] += 1
    result = sbs.compare(ours, release, HIVG, NARROW)
    assert result["first_divergent_stage"] == "bridge.7"
    assert not result["boxes_agree"] and not result["tokens_equal"]
    assert result["outputs"]["boxes"] == pytest.approx(2e-4, rel=1e-3)

    ours["output.boxes"] = ours["output.boxes"][:1]
    with pytest.raises(sbs.SideBySideError, match=r"output boxes: ours \(1, 4\), release \(2, 4\)"):
        sbs.compare(ours, release, HIVG, NARROW)


def test_timing_summary_and_the_speed_verdict():
    training = sbs.summarise_timing(
        "training", {"ours": [1.0, 3.0, 1.2], "release": [2.0, 2.0, 1.0]}, {"ours": 5.0, "release": 6.0}, 2
    )
    assert training["step_s"] == {"ours": 1.2, "release": 2.0}
    assert training["ratio_of_medians"] == pytest.approx(0.6)
    assert training["median_round_ratio"] == pytest.approx(1.2)  # rounds: 0.5, 1.5, 1.2
    assert training["round_ratio_range"] == pytest.approx([0.5, 1.5])
    assert training["samples_per_s"]["ours"] == pytest.approx(2 / 1.2)
    agreement = {"square": {"boxes_agree": True}, "letterboxed": {"boxes_agree": False}}
    assert sbs.targets(agreement, [training]) == {"boxes_agree_1e-4": False, "training_not_slower": "within noise"}
    slower = sbs.summarise_timing("training", {"ours": [2.0, 2.0], "release": [1.0, 1.5]}, {}, 2)
    faster = sbs.summarise_timing("training", {"ours": [1.0, 1.0], "release": [1.5, 0.9]}, {}, 2)
    assert sbs.targets({}, [slower])["training_not_slower"] == "no"
    assert sbs.targets({}, [faster])["training_not_slower"] == "yes"


def fake_report() -> dict:
    release = fake_outputs()
    agreement = {"square": sbs.compare({k: v.clone() for k, v in release.items()}, release, HIVG, NARROW)}
    timing = [
        sbs.summarise_timing(mode, {"ours": [0.9, 1.1], "release": [1.0, 1.0]}, {"ours": 2.0, "release": 2.0}, 2)
        for mode in ("training", "inference")
    ]
    counts = {"total": 19_704_901, "trainable": 5_453_956, "unread": 0}
    return {
        "method": "hivg",
        "release": {"path": "/checkout/HiVG", "commit": "abc123"},
        "machine": {
            "cpu": "Some CPU",
            "cpu_count": 2,
            "platform": "Linux",
            "load_average_1_5_15_min": {"start": [4.5, 3.0, 2.0], "end": None},
        },
        "settings": {"threads": 1, "batch": 2, "steps": 2, "stage": "stage3", "seed": 0, "release_python": "/py"},
        "sizes": [
            {
                "size": {**vars(NARROW)},
                "description": NARROW.describe(),
                "parameters": {
                    "ours": counts,
                    "release": {"total": 19_769_349, "trainable": 5_518_404, "unread": 64_448},
                },
                "build_s": {"ours": 1.0, "release": 2.0},
                "versions": {"ours": {"torch": "2.14.1", "peft": "0.21.2"}, "release": {"peft": "0.3.0"}},
                "agreement": agreement,
                "timing": timing,
                "targets": sbs.targets(agreement, timing),
            }
        ],
        "failures": [{"size": "b", "error": "release worker exited 1 during 'build'; the end of its log"}],
        "wall_s": 12.0,
    }


def test_the_markdown_report_carries_every_figure():
    report = fake_report()
    json.dumps(report)  # the JSON side takes the same dict
    markdown = sbs.render_markdown(report)
    assert "release: /checkout/HiVG at abc123; its Python /py" in markdown
    assert "load average (1 min) at start / end: 4.5 / –" in markdown
    assert "## Size narrow: 112 px, vision width 192, text width 128, head 128 x 6 layers" in markdown
    assert "vgstudy 19,704,901 (5,453,956 trainable), release 19,769,349 (5,518,404 trainable)" in markdown
    assert "never reads: vgstudy 0, release 64,448; the rest: vgstudy 19,704,901 = release 19,704,901" in markdown
    assert "ours: torch 2.14.1, peft 0.21.2; release: peft 0.3.0" in markdown
    assert "boxes agree to 1e-4: yes; training step no slower than the release's: yes" in markdown
    assert "| square | 0.0e+00 | 0.0e+00 | 0.0e+00 | 0.0e+00 | yes | none |" in markdown
    assert "| bridge.11 | 0.0e+00 (0.0e+00) |" in markdown
    assert "| training | 2 | 1.000 | 1.000 | 2.00 | 2.00 | 1.00 | 1.00 (0.90–1.10) |" in markdown
    assert "## Size b: failed" in markdown and "exited 1 during 'build'" in markdown


# --- The worker protocol, and the release itself -------------------------------------------------------------------


@pytest.mark.slow  # a Python that imports torch, ~15 s on the loaded 2-core machine
def test_a_workers_error_comes_back_with_its_traceback(tmp_path, fake_release):
    args = sbs.parse_arguments(["hivg", "--release", str(fake_release), "--timeout-s", "300"])
    worker = sbs.Worker("ours", sys.executable, NARROW, args, tmp_path / "ours.log", dict(os.environ))
    try:
        with pytest.raises(
            sbs.SideBySideError, match=r"(?s)ours worker failed on 'forward':.*request 'forward' before 'build'"
        ):
            worker.request("forward", batch="x", out="y")
    finally:
        worker.close()
    assert worker.process.returncode == 0


RELEASE = os.environ.get("HIVG_RELEASE")


@pytest.mark.slow
@pytest.mark.skipif(
    not RELEASE,
    reason="HIVG_RELEASE is unset: set it to a checkout of linhuixiao/HiVG (and HIVG_RELEASE_PYTHON to a Python "
    "with its pins, transformers 4.30 and peft 0.3) to compare against the release",
)
def test_the_narrow_size_agrees_with_the_release(tmp_path):
    python = os.environ.get("HIVG_RELEASE_PYTHON", sys.executable)
    argv = ["hivg", "--release", RELEASE, "--python", python, "--sizes", "narrow", "--steps", "1"]
    report = sbs.main([*argv, "--out", str(tmp_path)])
    entry = report["sizes"][0]
    for case in ("square", "letterboxed"):
        agreement = entry["agreement"][case]
        assert agreement["boxes_agree"] and agreement["tokens_equal"], (case, agreement["outputs"])
        assert agreement["first_divergent_stage"] is None, case
    # the release has 4 modules its forward never reads (vgstudy leaves them out); everything else is the same
    unused = 2 * (NARROW.embed_dim * NARROW.vision_width + NARROW.vision_width) + NARROW.embed_dim
    unused += 77 * NARROW.vision_width
    ours, release = entry["parameters"]["ours"], entry["parameters"]["release"]
    assert release["unread"] == unused
    assert release["total"] - unused == ours["total"] and release["trainable"] - unused == ours["trainable"]
    assert (tmp_path / "results.md").read_text().startswith("# HiVG side by side")


TRANSVG_RELEASE = os.environ.get("TRANSVG_RELEASE")
TRANSVG_PYTHON = os.environ.get("TRANSVG_RELEASE_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(
    not TRANSVG_RELEASE or not (TRANSVG_PYTHON or importlib.util.find_spec("pytorch_pretrained_bert")),
    reason="TRANSVG_RELEASE and TRANSVG_RELEASE_PYTHON are not both set: set them to a checkout of "
    "djiajunustc/TransVG and a Python with its pins (torch, torchvision, pytorch-pretrained-bert 0.6.2, safetensors) "
    "to compare against the release",
)
def test_transvgs_narrow_size_agrees_with_the_release(tmp_path):
    python = TRANSVG_PYTHON or sys.executable
    argv = ["transvg", "--release", TRANSVG_RELEASE, "--python", python, "--sizes", "narrow", "--steps", "1"]
    report = sbs.main([*argv, "--out", str(tmp_path)])
    entry = report["sizes"][0]
    for case in ("square", "letterboxed"):
        agreement = entry["agreement"][case]
        assert agreement["boxes_agree"] and agreement["tokens_equal"], (case, agreement["outputs"])
        assert agreement["first_divergent_stage"] is None, case
    assert entry["parameters"]["ours"] == entry["parameters"]["release"]  # one to one, BERT's pooler unread on both
    assert (tmp_path / "results.md").read_text().startswith("# TransVG side by side")


MAPPER_RELEASE = os.environ.get("MAPPER_RELEASE")
MAPPER_PYTHON = os.environ.get("MAPPER_RELEASE_PYTHON")


@pytest.mark.slow  # DINOv2-B at 518 px on both sides: minutes on 2 cores
@pytest.mark.skipif(
    not MAPPER_RELEASE or not MAPPER_PYTHON,
    reason="MAPPER_RELEASE and MAPPER_RELEASE_PYTHON are not both set: set them to a checkout of liuting20/MaPPER and "
    "a Python with its pins (torch, torchvision, transformers 4.39.3, timm 0.5.4, pytorch-pretrained-bert 0.6.2, "
    "einops, ftfy, regex, safetensors) to compare against the release",
)
def test_mappers_narrow_size_agrees_with_the_release(tmp_path):
    argv = ["mapper", "--release", MAPPER_RELEASE, "--python", MAPPER_PYTHON, "--sizes", "narrow", "--steps", "1"]
    report = sbs.main([*argv, "--out", str(tmp_path)])
    entry = report["sizes"][0]
    for case in ("square", "letterboxed"):
        agreement = entry["agreement"][case]
        assert agreement["boxes_agree"] and agreement["tokens_equal"], (case, agreement["outputs"])
        assert agreement["first_divergent_stage"] is None, case
    # the weights each forward reads are the same; the release trains as many (its unused DyPA projection included)
    ours, release = entry["parameters"]["ours"], entry["parameters"]["release"]
    assert ours["total"] - ours["unread"] == release["total"] - release["unread"]
    assert ours["trainable"] == release["trainable"]
    assert (tmp_path / "results.md").read_text().startswith("# MaPPER side by side")
