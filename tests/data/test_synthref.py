"""SynthRef: determinism, proven unique reference (by an independent resolver), masks and boxes, splits, export."""

import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vgstudy.data.synthref import COLORS, FAMILIES, SPLITS, SynthRef, object_phrase, scene_caption
from vgstudy.errors import ConfigError

# --- An independent resolver ---------------------------------------------------------------------------------------
# It shares nothing with the generator but the symbolic scene: its own vocabulary, its own parser and its own
# geometry rules, written the way a careful viewer reads the picture. Each rule has a "maybe" band: an object that
# falls in it counts as a possible referent, so an expression a viewer could read two ways resolves to two objects.

COLOUR_OF = {
    "red": "red",
    "crimson": "red",
    "scarlet": "red",
    "green": "green",
    "emerald": "green",
    "blue": "blue",
    "cobalt": "blue",
    "yellow": "yellow",
    "golden": "yellow",
    "purple": "purple",
    "violet": "purple",
    "orange": "orange",
    "white": "white",
}
SIZE_OF = {"small": "small", "little": "small", "tiny": "small", "big": "big", "large": "big"}
NOUNS = {
    "circle": ["circle", "disc"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross", "plus"],
    "ring": ["ring", "donut", "hoop"],
}
SHAPE_OF = {w: s for s, words in NOUNS.items() for w in words}
SHAPE_OF_PLURAL = {(w + "es" if w.endswith(("x", "s")) else w + "s"): s for w, s in SHAPE_OF.items()}

# Relation phrases (as word tuples) -> (family, meaning).
RELATIONS = {
    ("left", "of"): ("relation", "left"),
    ("to", "the", "left", "of"): ("relation", "left"),
    ("on", "the", "left", "side", "of"): ("relation", "left"),
    ("right", "of"): ("relation", "right"),
    ("to", "the", "right", "of"): ("relation", "right"),
    ("on", "the", "right", "side", "of"): ("relation", "right"),
    ("above",): ("relation", "up"),
    ("below",): ("relation", "down"),
    ("under",): ("relation", "down"),
    ("beneath",): ("relation", "down"),
    ("next", "to"): ("relation", "near"),
    ("beside",): ("relation", "near"),
    ("near",): ("relation", "near"),
    ("close", "to"): ("relation", "near"),
    ("closer", "to"): ("comparative", "closer"),
    ("nearer", "to"): ("comparative", "closer"),
    ("closest", "to"): ("comparative", "closest"),
    ("nearest", "to"): ("comparative", "closest"),
    ("farther", "from"): ("comparative", "farther"),
    ("further", "from"): ("comparative", "farther"),
    ("farthest", "from"): ("comparative", "farthest"),
    ("furthest", "from"): ("comparative", "farthest"),
}
# Position words -> (direction the ranking starts from, rank).
EXTREME_ADJECTIVES = {
    "leftmost": "left",
    "rightmost": "right",
    "topmost": "top",
    "highest": "top",
    "bottommost": "bottom",
    "lowest": "bottom",
}
EXTREME_TAILS = {
    ("on", "the", "far", "left"): "left",
    ("on", "the", "far", "right"): "right",
    ("furthest", "to", "the", "left"): "left",
    ("furthest", "to", "the", "right"): "right",
    ("at", "the", "top"): "top",
    ("at", "the", "bottom"): "bottom",
}
ORDINALS = {"first": 1, "second": 2, "third": 3}
BIGGER = {"bigger": "big", "larger": "big", "smaller": "small"}
BIGGEST = {"biggest": "big", "largest": "big", "smallest": "small"}


def parse_noun_phrase(words):
    """Adjectives then a noun -> ({attribute: value}, plural, remaining words)."""
    constraints = {}
    i = 0
    while words[i] in COLOUR_OF or words[i] in SIZE_OF:
        key, table = ("color", COLOUR_OF) if words[i] in COLOUR_OF else ("size", SIZE_OF)
        assert key not in constraints, f"two {key} words in {words}"
        constraints[key] = table[words[i]]
        i += 1
    noun = words[i]
    if noun in SHAPE_OF:
        constraints["shape"], plural = SHAPE_OF[noun], False
    else:
        assert noun in SHAPE_OF_PLURAL, f"unknown noun {noun!r}"
        constraints["shape"], plural = SHAPE_OF_PLURAL[noun], True
    return constraints, plural, words[i + 1 :]


def matching(scene, constraints):
    return [i for i, o in enumerate(scene.objects) if all(getattr(o, k) == v for k, v in constraints.items())]


def centre(obj):
    x1, y1, x2, y2 = obj.box_xyxy
    return (x1 + x2) / 2, (y1 + y2) / 2


def half_extent(obj):
    x1, y1, x2, y2 = obj.box_xyxy
    return max(x2 - x1, y2 - y1) / 2


def by_rank(scene, candidates, start, rank):
    """Candidates that could be the `rank`-th from `start`: neighbours closer than 3% of the image both count."""
    key = {"left": 0, "right": 0, "top": 1, "bottom": 1}[start]
    sign = -1 if start in ("right", "bottom") else 1
    coords = sorted((sign * centre(scene.objects[c])[key], c) for c in candidates)
    assert rank <= len(coords), "an ordinal beyond the number of candidates"
    value = coords[rank - 1][0]
    return [c for v, c in coords if abs(v - value) < 0.03 * scene.image_size]


def extreme_by(values, candidates, largest, ratio):
    """The candidate with the largest (or smallest) value, and any other within `ratio` of it."""
    best = max(values) if largest else min(values)
    return [c for v, c in zip(values, candidates, strict=True) if (v * ratio >= best if largest else v <= best * ratio)]


def relation_maybe(obj, anchor, meaning, size):
    """True when the relation plausibly holds for a viewer (clearly or in the maybe band)."""
    (ox, oy), (ax, ay) = centre(obj), centre(anchor)
    if meaning == "near":
        return math.hypot(ox - ax, oy - ay) - half_extent(obj) - half_extent(anchor) < 0.18 * size
    along = {"left": ax - ox, "right": ox - ax, "up": ay - oy, "down": oy - ay}[meaning]
    return along > 0.02 * size


def relation_clear(obj, anchor, meaning, size):
    (ox, oy), (ax, ay) = centre(obj), centre(anchor)
    if meaning == "near":
        return math.hypot(ox - ax, oy - ay) - half_extent(obj) - half_extent(anchor) < 0.1 * size
    along = {"left": ax - ox, "right": ox - ax, "up": ay - oy, "down": oy - ay}[meaning]
    return along > 0.06 * size


def resolve(text, scene):
    """(family read from the text, objects the text may refer to, objects the head noun phrase alone fits)."""
    words = text.split()
    assert words[0] == "the", text
    words, size = words[1:], scene.image_size
    if words[0] in ORDINALS:
        constraints, plural, rest = parse_noun_phrase(words[1:])
        assert not plural and rest[:2] == ["from", "the"] and len(rest) == 3, text
        candidates = matching(scene, constraints)
        return "position", by_rank(scene, candidates, rest[2], ORDINALS[words[0]]), candidates
    if words[0] in EXTREME_ADJECTIVES:
        constraints, plural, rest = parse_noun_phrase(words[1:])
        assert not plural and not rest, text
        candidates = matching(scene, constraints)
        return "position", by_rank(scene, candidates, EXTREME_ADJECTIVES[words[0]], 1), candidates
    if words[0] in BIGGER or words[0] in BIGGEST:
        if words[1:4] == ["of", "the", "two"]:
            constraints, plural, rest = parse_noun_phrase(words[4:])
            assert plural and not rest, text
        else:
            constraints, plural, rest = parse_noun_phrase(words[1:])
            assert not plural and not rest, text
        assert "size" not in constraints, f"a size word inside a size comparison: {text}"
        candidates = matching(scene, constraints)
        if words[0] in BIGGER:
            assert len(candidates) == 2, f"a comparative needs exactly two candidates: {text}"
        wanted = {**BIGGER, **BIGGEST}[words[0]]
        radii = [scene.objects[c].radius for c in candidates]
        return "comparative", extreme_by(radii, candidates, wanted == "big", 1.3), candidates
    constraints, plural, rest = parse_noun_phrase(words)
    assert not plural, text
    candidates = matching(scene, constraints)
    if not rest:
        return "attribute", candidates, candidates
    if tuple(rest) in EXTREME_TAILS:
        return "position", by_rank(scene, candidates, EXTREME_TAILS[tuple(rest)], 1), candidates
    if rest[:2] == ["that", "is"]:
        rest = rest[2:]
    phrase = next(p for p in sorted(RELATIONS, key=len, reverse=True) if tuple(rest[: len(p)]) == p)
    family, meaning = RELATIONS[phrase]
    assert rest[len(phrase)] == "the", text
    anchor_constraints, anchor_plural, tail = parse_noun_phrase(rest[len(phrase) + 1 :])
    assert not anchor_plural and not tail, text
    anchors = matching(scene, anchor_constraints)
    assert len(anchors) == 1, f"the anchor of {text!r} is not unique: {anchors}"
    anchor = scene.objects[anchors[0]]
    assert anchor.visible_fraction >= 0.7, f"the anchor of {text!r} is hidden"
    candidates = [c for c in candidates if c != anchors[0]]
    if family == "relation":
        clear = [c for c in candidates if relation_clear(scene.objects[c], anchor, meaning, size)]
        maybe = [c for c in candidates if relation_maybe(scene.objects[c], anchor, meaning, size)]
        return family, sorted(set(clear) | set(maybe)), candidates
    if meaning in ("closer", "farther"):
        assert len(candidates) == 2, f"a comparative needs exactly two candidates: {text}"
    ax, ay = centre(anchor)
    distances = [math.hypot(centre(scene.objects[c])[0] - ax, centre(scene.objects[c])[1] - ay) for c in candidates]
    return family, extreme_by(distances, candidates, meaning in ("farther", "farthest"), 1.3), candidates


# --- Unique reference, over thousands of samples --------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_every_expression_refers_to_exactly_the_target(split):
    data = SynthRef(split, 1000, seed=7)
    families = Counter()
    for i in range(len(data)):
        text, family, scene = data.expression(i)
        read_family, referents, head_fits = resolve(text, scene)
        assert referents == [scene.target], f"{data._source(i)} {text!r}: refers to {referents}, not {scene.target}"
        assert read_family == family, f"{text!r} reads as {read_family}, labelled {family}"
        assert scene.objects[scene.target].visible_fraction >= 0.7
        if family == "attribute":
            # Minimal: without any one of its adjectives the phrase would fit more than the target.
            constraints, _, _ = parse_noun_phrase(text.split()[1:])
            for dropped in [k for k in constraints if k != "shape"]:
                assert len(matching(scene, {k: v for k, v in constraints.items() if k != dropped})) > 1, text
        else:
            assert len(head_fits) >= 2, f"{text!r}: the head noun alone already picks the target"
        families[family] += 1
    if split == "testA":
        assert set(families) == {"attribute"}
    elif split == "testB":
        assert "attribute" not in families and set(families) == {"relation", "position", "comparative"}
    else:
        assert set(families) == set(FAMILIES)
        assert all(0.17 < families[f] / len(data) < 0.33 for f in FAMILIES), families


def test_resolver_catches_a_wrong_or_ambiguous_expression():
    # The resolver must be able to fail: a relation whose anchor is swapped, and a bare ambiguous head noun.
    data = SynthRef("testB", 200, seed=7, families=["relation"])
    text, _, scene = data.expression(0)
    _, referents, head_fits = resolve(text, scene)
    assert referents == [scene.target] and len(head_fits) >= 2
    words = text.split()
    noun_at = next(i for i, w in enumerate(words) if w in SHAPE_OF)
    assert resolve(" ".join(words[: noun_at + 1]), scene)[1] == head_fits  # the head noun alone is ambiguous
    flipped = {"left": "right", "right": "left", "above": "below", "below": "above", "under": "above"}
    for i in range(len(data)):
        text, _, scene = data.expression(i)
        swapped = " ".join(flipped.get(w, w) for w in text.split())
        if swapped != text and resolve(swapped, scene)[1] != [scene.target]:
            return
    pytest.fail("no flipped relation changed what the resolver picks")


# --- Determinism ---------------------------------------------------------------------------------------------------


def sample_digest(sample):
    h = hashlib.sha256()
    h.update(sample.image.numpy().tobytes())
    h.update(sample.text.encode())
    h.update(sample.box_xyxy.numpy().tobytes())
    h.update(sample.mask.numpy().tobytes())
    return h.hexdigest()


DIGEST_SCRIPT = """
import hashlib, json, sys
from vgstudy.data.synthref import SynthRef
out = {}
for split in ("train", "testB"):
    data = SynthRef(split, 6, seed=11)
    for i in range(6):
        s = data[i]
        h = hashlib.sha256()
        for part in (s.image.numpy(), s.text.encode(), s.box_xyxy.numpy(), s.mask.numpy()):
            h.update(part if isinstance(part, bytes) else part.tobytes())
        out[f"{split}:{i}"] = h.hexdigest()
print(json.dumps(out))
"""


def test_samples_are_identical_across_processes():
    result = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    theirs = json.loads(result.stdout)
    ours = {
        f"{split}:{i}": sample_digest(SynthRef(split, 6, seed=11)[i]) for split in ("train", "testB") for i in range(6)
    }
    assert theirs == ours


def test_same_arguments_give_the_same_sample_and_scene_matches_getitem():
    a, b = SynthRef("val", 20, seed=3), SynthRef("val", 20, seed=3)
    for i in (0, 7, 19):
        sa, sb = a[i], b[i]
        assert sample_digest(sa) == sample_digest(sb) and sa.family == sb.family
        assert a.scene(i) == sa.scene and a.expression(i) == (sa.text, sa.family, sa.scene)
    assert sample_digest(a[-1]) == sample_digest(a[19])


def test_different_seeds_and_splits_give_different_scenes():
    reference = SynthRef("train", 30, seed=0)
    for other in (SynthRef("train", 30, seed=1), SynthRef("val", 30, seed=0), SynthRef("testA", 30, seed=0)):
        same = sum(reference.scene(i).objects == other.scene(i).objects for i in range(30))
        assert same == 0
        assert not torch.equal(reference[0].image, other[0].image)


# --- Boxes, masks, pixels ------------------------------------------------------------------------------------------


def check_sample(sample, image_size):
    assert sample.image.shape == (3, image_size, image_size) and sample.image.dtype == torch.uint8
    assert sample.mask.shape == (image_size, image_size) and sample.mask.dtype == torch.bool
    assert sample.box_xyxy.shape == (4,) and sample.box_xyxy.dtype == torch.float32
    ys, xs = sample.mask.nonzero(as_tuple=True)
    assert len(ys) > 0
    tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert torch.allclose(sample.box_xyxy, tight, atol=1.0), (sample.box_xyxy, tight)
    x1, y1, x2, y2 = sample.box_xyxy.tolist()
    assert 0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size
    target = sample.scene.objects[sample.scene.target]
    assert tuple(sample.box_xyxy.tolist()) == target.box_xyxy
    # The mask's pixels show the target's colour: their median is nearest to it among the palette (objects are shaded
    # by at most 12%, so within about 0.12 * 255 * sqrt(3) = 53 of it).
    median = sample.image[:, sample.mask].float().median(dim=1).values
    distances = {
        name: torch.dist(median, torch.tensor(rgb, dtype=torch.float32)).item() for name, rgb in COLORS.items()
    }
    assert min(distances, key=distances.get) == target.color and distances[target.color] < 55, distances


@pytest.mark.parametrize("split", SPLITS)
def test_box_frames_the_mask_and_the_mask_has_the_target_colour(split):
    data = SynthRef(split, 25, seed=5)
    for i in range(len(data)):
        sample = data[i]
        check_sample(sample, 128)
        assert sample.source == f"synthref:{split}:{i}"
        assert all(obj.visible_fraction >= 0.6 for obj in sample.scene.objects)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    index=st.integers(0, 10**6),
    image_size=st.integers(32, 160),
    objects=st.tuples(st.integers(3, 8), st.integers(0, 3)),
    split=st.sampled_from(SPLITS),
)
def test_any_seed_size_and_object_count_gives_a_valid_unique_sample(seed, index, image_size, objects, split):
    min_objects, extra = objects
    max_objects = min(8, min_objects + extra)
    data = SynthRef(
        split, index + 1, seed=seed, image_size=image_size, min_objects=min_objects, max_objects=max_objects
    )
    sample = data[index]
    check_sample(sample, image_size)
    assert min_objects <= len(sample.scene.objects) <= max_objects
    assert resolve(sample.text, sample.scene)[1] == [sample.scene.target]


def test_family_filter():
    data = SynthRef("train", 60, seed=2, families=["position", "comparative"])
    assert {data.expression(i)[1] for i in range(len(data))} == {"position", "comparative"}


# --- Captions and phrases ------------------------------------------------------------------------------------------


def test_caption_names_every_object_and_is_reproducible():
    scene = SynthRef("train", 5, seed=0).scene(4)
    caption = scene_caption(scene, 3)
    assert caption == scene_caption(scene, np.random.default_rng(3))
    objects = caption.split(" on a ")[0].replace(" and ", ", ").split(", ")
    assert len(objects) == len(scene.objects)
    described = Counter()
    for phrase in objects:
        article, size_word, colour_word, noun = phrase.split()
        assert article == "a"
        described[(SIZE_OF[size_word], COLOUR_OF[colour_word], SHAPE_OF[noun])] += 1
    assert described == Counter((o.size, o.color, o.shape) for o in scene.objects)
    assert {scene_caption(scene, s) for s in range(10)} != {caption}


def test_object_phrase():
    obj = SynthRef("testA", 1, seed=0).scene(0).objects[0]
    assert object_phrase(obj) == f"the {obj.size} {obj.color} {obj.shape}"


# --- Export -------------------------------------------------------------------------------------------------------


def test_export_writes_images_and_a_release_format_split_file(tmp_path):
    data = SynthRef("val", 5, seed=4)
    assert data.export(tmp_path, name="synth") == tmp_path
    split_file = tmp_path / "synth" / "synth_val.pth"
    entries = torch.load(split_file, weights_only=True)
    assert isinstance(entries, list) and len(entries) == 5
    for i, entry in enumerate(entries):
        file_name, sample_id, box_xywh, text, attributes = entry
        sample = data[i]
        assert file_name == f"synth_val_{i:06d}.png" and sample_id == i
        assert all(type(v) is float for v in box_xywh) and len(box_xywh) == 4
        x1, y1, x2, y2 = sample.box_xyxy.tolist()
        assert box_xywh == [x1, y1, x2 - x1, y2 - y1]
        assert text == sample.text and attributes == [sample.family]
        pixels = np.asarray(Image.open(tmp_path / "images" / file_name).convert("RGB"))
        assert np.array_equal(pixels, sample.image.permute(1, 2, 0).numpy())
    assert not [p for p in Path(tmp_path).rglob("*") if p.name.endswith(".tmp")]


def test_export_of_an_empty_split_and_bad_export_arguments(tmp_path):
    SynthRef("testA", 0).export(tmp_path)
    assert torch.load(tmp_path / "synthref" / "synthref_testA.pth", weights_only=True) == []
    with pytest.raises(ConfigError, match="image_format"):
        SynthRef("val", 1).export(tmp_path, image_format="gif")
    with pytest.raises(ConfigError, match="name"):
        SynthRef("val", 1).export(tmp_path, name="../escape")


# --- Bad arguments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "test"}, "unknown split 'test'"),
        ({"n": -1}, "n must be >= 0"),
        ({"n": 2.5}, "n must be an integer"),
        ({"seed": -3}, "seed must be >= 0"),
        ({"image_size": 31}, "image_size must be >= 32"),
        ({"image_size": "128"}, "image_size must be an integer"),
        ({"min_objects": 5, "max_objects": 4}, "min_objects <= max_objects"),
        ({"min_objects": 2}, "min_objects must be >= 3"),
        ({"max_objects": 9}, "max_objects <= 8"),
        ({"families": ["colour"]}, "unknown families"),
        ({"families": []}, "families is empty"),
        ({"families": "attribute"}, "must be a list"),
        ({"split": "testA", "families": ["relation"]}, "split 'testA' has no \\['relation'\\]"),
        ({"split": "testB", "families": ["attribute", "position"]}, "split 'testB' has no \\['attribute'\\]"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs, message):
    arguments = {"split": "train", "n": 4, **kwargs}
    with pytest.raises(ConfigError, match=message):
        SynthRef(**arguments)


def test_index_out_of_range():
    data = SynthRef("train", 3)
    for index in (3, -4):
        with pytest.raises(IndexError, match=f"index {index} out of range for 3 samples"):
            data[index]
        with pytest.raises(IndexError):
            data.scene(index)


def test_object_scale_grows_the_objects_and_scale_one_changes_nothing():
    default, same = SynthRef("val", 40, seed=3), SynthRef("val", 40, seed=3, object_scale=1.0)
    assert all(default.expression(i) == same.expression(i) for i in range(len(default)))
    big = SynthRef("val", 40, seed=3, object_scale=1.6)

    def mean_radius(data):
        return np.mean([obj.radius for i in range(len(data)) for obj in data.scene(i).objects])

    assert 1.45 < mean_radius(big) / mean_radius(default) < 1.75  # drawn from the same ranges, x 1.6
    sample = big[0]
    assert sample.image.shape == (3, 128, 128) and sample.box_xyxy.min() >= 0 and sample.box_xyxy.max() <= 128
    assert "object_scale=1.6" in repr(big) and "object_scale" not in repr(default)


@pytest.mark.parametrize("bad", [0.3, 2.5, "1.5", True, float("nan")])
def test_object_scale_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="object_scale must be a number in"):
        SynthRef("val", 4, object_scale=bad)
