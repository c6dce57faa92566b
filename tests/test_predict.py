"""Single-image prediction: loading trained runs, the mapping back to image pixels, the CLI, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vgstudy.__main__ import main
from vgstudy.checkpoint import latest_checkpoint, load_into, load_state_dict, save_state_dict, write_checkpoint
from vgstudy.data.sample import Sample
from vgstudy.data.synthref import SynthRef
from vgstudy.data.transforms import GroundingTransform, TransformConfig
from vgstudy.errors import CheckpointError, ConfigError, DataError
from vgstudy.experiment import train_and_evaluate
from vgstudy.models.registry import build
from vgstudy.predict import (
    MODEL_CARD_FILE,
    Predictor,
    input_box_to_image,
    load_predictor,
    read_image,
    read_model_card,
    write_model_card,
)
from vgstudy.train import MODEL_FILE, Stage
from vgstudy.viz import PRED_COLOUR

# A small TransVG on clip:tiny's towers (random weights, built in about a second): a narrow, one-layer fusion.
MODEL = "transvg-tiny-clip"
OVERRIDES = {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64}
TEXT = "the red circle"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run: one Trainer step on 4 SynthRef samples, with its model card."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build(MODEL, **OVERRIDES)
    write_model_card(folder, MODEL, OVERRIDES)
    train_and_evaluate(
        model,
        SynthRef("train", 4, seed=0),
        {},
        folder,
        stages=(Stage("main", epochs=1, lr=1e-3),),
        batch_size=4,
        seed=0,
    )
    return folder


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return load_predictor(run_dir)


def wide_image(height: int = 90, width: int = 150, seed: int = 0) -> np.ndarray:
    """A non-square uint8 (H, W, 3) image: a bright rectangle on noise."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    image[20:60, 30:90, 0] = 230
    return image


# --- The model card and loading -------------------------------------------------------------------------------------


def test_model_card_round_trips_and_paths_become_strings(tmp_path):
    write_model_card(tmp_path, MODEL, {"dim": 32, "visual_weights": tmp_path / "w.safetensors", "x": (1, 2)})
    assert read_model_card(tmp_path) == (
        MODEL,
        {"dim": 32, "visual_weights": str(tmp_path / "w.safetensors"), "x": [1, 2]},
    )
    assert read_model_card(tmp_path / "nothing") is None


def test_predictor_from_a_run_gives_the_boxes_of_the_trained_model_called_directly(run_dir, predictor):
    # The predictor holds the trained weights: those of the run's newest checkpoint, not a fresh build's.
    saved = load_state_dict(latest_checkpoint(run_dir / "checkpoints") / MODEL_FILE)
    loaded = predictor.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert predictor.name == MODEL

    image = wide_image()
    prediction = predictor.predict(image, TEXT)

    torch.manual_seed(1)  # other random weights, so only the loaded ones can give the same boxes
    direct = build(MODEL, **OVERRIDES)
    load_into(direct, saved)
    direct.eval()
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    item = GroundingTransform(direct.transform)(Sample(pixels, TEXT, torch.tensor([0.0, 0.0, 150.0, 90.0])))
    with torch.no_grad():
        boxes_cxcywh = direct(item["image"][None], [TEXT]).boxes[0]
    assert prediction.box_xyxy == tuple(input_box_to_image(boxes_cxcywh, (90, 150), direct.transform).tolist())
    assert prediction.image_size == (90, 150) and prediction.text == TEXT and prediction.score is None
    x1, y1, x2, y2 = prediction.box_xyxy
    assert 0 <= x1 <= x2 <= 150 and 0 <= y1 <= y2 <= 90

    # The same image as a file and as a PIL image gives the same box.
    path = Path(predictor.checkpoint).parent.parent.parent / "wide.png"
    Image.fromarray(image).save(path)
    assert predictor.predict(path, TEXT).box_xyxy == prediction.box_xyxy
    assert predictor.predict(Image.fromarray(image), TEXT).box_xyxy == prediction.box_xyxy


def test_a_checkpoint_folder_and_a_weights_file_load_the_same_model(run_dir, predictor):
    image = wide_image(seed=3)
    expected = predictor.predict(image, TEXT).box_xyxy
    step_dir = latest_checkpoint(run_dir / "checkpoints")
    assert load_predictor(step_dir).predict(image, TEXT).box_xyxy == expected  # the card of its run
    from_file = load_predictor(step_dir / MODEL_FILE, model=MODEL, **OVERRIDES)
    assert from_file.predict(image, TEXT).box_xyxy == expected


# --- Mapping back to the original image -----------------------------------------------------------------------------


def test_input_box_to_image_by_hand():
    # 100 x 200 into 128: resized to 64 x 128, padded 32 px above and below; input pixels (48, 48, 80, 80).
    config = TransformConfig(image_size=128)
    box = input_box_to_image(torch.tensor([0.5, 0.5, 0.25, 0.25]), (100, 200), config)
    assert torch.allclose(box, torch.tensor([75.0, 25.0, 125.0, 75.0]), atol=1e-4)
    # Input pixels (32, 0, 96, 25.6): x maps to 50..150; y lies in the padding above the image, clipped to row 0.
    box = input_box_to_image(torch.tensor([0.5, 0.1, 0.5, 0.2]), (100, 200), config)
    assert torch.allclose(box, torch.tensor([50.0, 0.0, 150.0, 0.0]), atol=1e-4)
    with pytest.raises(ConfigError, match="eval transform"):
        input_box_to_image(torch.tensor([0.5, 0.5, 0.2, 0.2]), (100, 200), TransformConfig(train=True))


@given(
    height=st.integers(8, 300),
    width=st.integers(8, 300),
    corners=st.tuples(*[st.floats(0.0, 1.0)] * 4),
    image_size=st.sampled_from([64, 128, 224]),
)
def test_input_box_to_image_inverts_the_eval_transform(height, width, corners, image_size):
    u1, u2, v1, v2 = corners
    x1, x2 = sorted((u1 * width, u2 * width))
    y1, y2 = sorted((v1 * height, v2 * height))
    x2, y2 = max(x2, x1 + 1.0), max(y2, y1 + 1.0)
    if x2 > width or y2 > height:
        x1, x2 = min(x1, width - 1.0), min(x2, float(width))
        y1, y2 = min(y1, height - 1.0), min(y2, float(height))
    box = torch.tensor([x1, y1, x2, y2])
    config = TransformConfig(image_size=image_size)
    sample = Sample(torch.zeros(3, height, width, dtype=torch.uint8), "x", box)
    box_cxcywh = GroundingTransform(config)(sample)["box_cxcywh"]  # the forward mapping
    back = input_box_to_image(box_cxcywh, (height, width), config)
    # float32 normalised boxes: a few thousandths of an input pixel, times at most 300 / 8 on the way back
    assert torch.allclose(back, box, atol=0.02), (back.tolist(), box.tolist())


# --- The command line -----------------------------------------------------------------------------------------------


def test_cli_prints_the_box_and_writes_the_overlay(run_dir, predictor, tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    Image.fromarray(np.full((90, 150, 3), 128, dtype=np.uint8)).save(image_path)
    out = tmp_path / "overlays" / "scene-box.png"
    code = main(
        ["predict", "--checkpoint", str(run_dir), "--image", str(image_path), "--text", TEXT, "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4
    numbers = [float(v) for v in printed]
    expected = predictor.predict(image_path, TEXT).box_xyxy
    assert numbers == pytest.approx(expected, abs=0.005)

    overlay = np.asarray(Image.open(out).convert("RGB"))
    assert overlay.shape == (90, 150, 3)
    red = tuple(int(PRED_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    drawn_y, drawn_x = np.nonzero((overlay == red).all(-1))
    assert len(drawn_x) > 0
    x1, y1, x2, y2 = expected
    assert drawn_x.min() >= np.floor(x1) - 2 and drawn_x.max() <= np.ceil(x2) + 2
    assert drawn_y.min() >= np.floor(y1) - 2 and drawn_y.max() <= np.ceil(y2) + 2
    untouched = (overlay == 128).all(-1)
    assert untouched.sum() == overlay.shape[0] * overlay.shape[1] - len(drawn_x)  # only the box outline is drawn


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    Image.fromarray(wide_image()).save(image_path)
    code = main(["predict", "--checkpoint", str(tmp_path / "absent"), "--image", str(image_path), "--text", TEXT])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vgstudy predict: error: checkpoint") and "absent does not exist" in error
    assert "\n" not in error


# --- Bad input ------------------------------------------------------------------------------------------------------


def test_missing_checkpoint_and_run_without_model(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_predictor(tmp_path / "absent", model=MODEL)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_predictor(tmp_path / "run", model=MODEL)
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="model=<registered name>"):
        load_predictor(garbage)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_predictor(garbage, model=MODEL, **OVERRIDES)


def test_unknown_model_name_suggests_the_closest(run_dir):
    with pytest.raises(ConfigError, match="did you mean 'transvg-tiny-clip'"):
        load_predictor(run_dir, model="transvg-tiny-clp")
    with pytest.raises(ConfigError, match="did you mean 'transvg-tiny-clip'"):
        write_model_card(run_dir / "other", "transvg-tiny-clp")


def test_model_card_refuses_what_json_cannot_hold(tmp_path):
    with pytest.raises(ConfigError, match="visual_module is a Linear"):
        write_model_card(tmp_path, MODEL, {"visual_module": torch.nn.Linear(2, 2)})
    (tmp_path / MODEL_CARD_FILE).write_text(json.dumps({"overrides": {}}))
    with pytest.raises(CheckpointError, match="model card"):
        read_model_card(tmp_path)


def test_checkpoint_of_another_model_lists_the_keys(run_dir):
    # The card's model with a two-layer fusion: the run's weights lack the second layer.
    with pytest.raises(CheckpointError, match=r"does not hold model 'transvg-tiny-clip'.*missing.*head\.") as error:
        load_predictor(run_dir, depth=2)
    assert "'depth': 2" in str(error.value)
    with pytest.raises(CheckpointError, match="different shape"):
        load_predictor(run_dir, dim=48)


def test_bad_images_and_text(predictor, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError, match=f"image {corrupt} cannot be decoded"):
        predictor.predict(corrupt, TEXT)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(wide_image()).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated.png cannot be decoded"):
        predictor.predict(truncated, TEXT)
    with pytest.raises(DataError, match="does not exist"):
        predictor.predict(tmp_path / "absent.jpg", TEXT)
    with pytest.raises(DataError, match="expected uint8"):
        predictor.predict(wide_image().astype(np.float32), TEXT)
    for text in ("", "   \n", None):
        with pytest.raises(DataError, match="non-empty referring expression"):
            predictor.predict(wide_image(), text)
    with pytest.raises(ConfigError, match="device='no-such-device'"):
        Predictor(predictor.model, device="no-such-device")


@pytest.mark.slow  # three HiVG builds (peft): about 15 s on 2 cores
def test_a_staged_model_is_rebuilt_in_the_stage_its_checkpoint_was_saved_in(tmp_path):
    # HiVG adds a fresh LoRA adapter per HiLoRA stage: its stage-2 weights fit only a model taken through the stages.
    torch.manual_seed(0)
    model = build("hivg-tiny")
    model.enter_stage("stage2")
    state = {"stage": "stage2", "stage_index": 1, "config": {"stages": [{"name": "stage1"}, {"name": "stage2"}]}}
    step_dir = write_checkpoint(
        tmp_path / "checkpoints", 7, lambda folder: save_state_dict(folder / MODEL_FILE, model.state_dict()), state
    )
    image = wide_image()
    model.eval()
    expected = Predictor(model).predict(image, TEXT).box_xyxy
    assert load_predictor(step_dir, model="hivg-tiny").predict(image, TEXT).box_xyxy == expected
    with pytest.raises(CheckpointError, match="missing"):
        load_predictor(step_dir / MODEL_FILE, model="hivg-tiny")  # a bare file: the model stays in its first stage
    from_file = load_predictor(step_dir / MODEL_FILE, model="hivg-tiny", stage="stage2")
    assert from_file.predict(image, TEXT).box_xyxy == expected


def test_read_image_turns_photos_upright_and_accepts_arrays(tmp_path):
    # A camera's portrait photo: stored 150 wide x 90 high, EXIF orientation 6 (shown rotated by 90 degrees).
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide_image()).save(path, exif=exif)
    assert read_image(path).size == (90, 150)  # (width, height) as shown
    grey = read_image(np.zeros((5, 7), dtype=np.uint8))
    assert grey.mode == "RGB" and grey.size == (7, 5)
    with pytest.raises(DataError, match="expected a path"):
        read_image(torch.zeros(3, 5, 7, dtype=torch.uint8))
