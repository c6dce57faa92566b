# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The task and the data
#
# **Referring expression comprehension** (REC, also called *visual grounding*): given an image and a sentence such as
# *"the man in the red shirt on the left"*, output the one box the sentence refers to. Every paper in this study —
# TransVG, HiVG, MaPPER, EpmVG — is scored the same way: **Acc@0.5**, the share of samples whose predicted box overlaps
# the ground-truth box with an intersection-over-union (IoU) of at least 0.5.
#
# This notebook builds the ground every later notebook stands on:
#
# 1. the metric, on real tensors;
# 2. **SynthRef**, the built-in synthetic data set (scenes, expressions, masks, captions, splits);
# 3. the grounding-aware transforms and the two tokenisers the models use;
# 4. the export → real-loader round trip (SynthRef written in the release's split-file format and read back);
# 5. the **trivial baselines** — what a model gets without reading the expression — the floor for every accuracy later;
# 6. how to point the loader at the real data sets.
#
# It runs in under a minute on a laptop CPU with the defaults below (`profile = "tiny"`); papermill can rerun it with
# `dataset`, `data_root` and `image_root` pointing at real split files.

# %% tags=["parameters"]
profile = "tiny"  # tiny | study | paper
seed = 0
device = "cpu"
out_dir = "../runs"  # relative to notebooks/
run_id = None  # default: a timestamp
dataset = "synthref"  # or unc, unc+, gref, gref_umd, referit, flickr with data_root and image_root
data_root = None
image_root = None
image_size = 128
n_train = 2000  # scenes summarised in the statistics
n_eval = 500  # samples per evaluation split

# %%
import json
from collections import Counter

import matplotlib.pyplot as plt
import torch

import vgstudy
from vgstudy import evaluate, viz
from vgstudy.config import DataParams, as_dict
from vgstudy.data import SynthRef, load_split
from vgstudy.notebook import run_dir

params = vgstudy.config.load(locals(), DataParams)
vgstudy.seed_everything(params.seed)
out = run_dir(params.out_dir, "00_task_and_data", params.run_id)
print(params)

# %% [markdown]
# ## 1 · The metric
#
# A prediction is right when IoU(prediction, ground truth) ≥ 0.5. IoU is the area of the intersection over the area of
# the union; it does not change when both boxes are scaled together, so it can be computed on pixels or on boxes
# normalised by the image size. The helpers below are thin wrappers over `torchvision.ops`.

# %%
vgstudy.show_source(evaluate.box_metrics)

# %%
# NBVAL_CHECK_OUTPUT
gt = torch.tensor([[20.0, 20.0, 60.0, 60.0]])
for name, pred in {
    "exact": [20, 20, 60, 60],
    "shifted by a quarter": [30, 20, 70, 60],
    "shifted by half": [40, 20, 80, 60],
    "twice as big, same centre": [0, 0, 80, 80],
}.items():
    iou = evaluate.paired_iou(torch.tensor([pred], dtype=torch.float32), gt).item()
    print(f"{name:28s} IoU = {iou:.3f}  correct at 0.5: {iou >= 0.5}")

# %% [markdown]
# Acc@0.5 is forgiving about the exact edges but not about the object: a box on the right object that is twice too
# large already fails (IoU 0.25). Acc@0.75 and the mean IoU are reported beside it.
#
# ## 2 · SynthRef
#
# Real grounding data sets need COCO-sized downloads and GPUs. SynthRef is the study's built-in data set: procedural
# scenes of 3–6 coloured shapes on textured backgrounds, and a small grammar that writes an expression referring to
# exactly one of them. Every sample is a pure function of *(seed, split, index)* — nothing is stored, and the same
# parameters give the same bytes on every machine.
#
# Expressions come in **families** that mirror what makes REC hard:
# - `attribute` — *"the red circle"*: colour, shape and size alone pick the object;
# - `relation` — *"the square left of the blue star"*: the object is named through another one;
# - `position` — *"the leftmost triangle"*, *"the second circle from the top"*;
# - `comparative` — *"the bigger green cross"*.
#
# Splits echo RefCOCO: `testA` holds only attribute expressions, `testB` only those that need relations, positions or
# comparisons; `train` and `val` mix all four.

# %%
splits = {
    name: SynthRef(name, params.n_eval, seed=params.seed, image_size=params.image_size)
    for name in ("val", "testA", "testB")
}
train = SynthRef("train", params.n_train, seed=params.seed, image_size=params.image_size)
tour = [train[i] for i in range(8)]
fig = viz.sample_grid(tour, titles=[s.family for s in tour], ncols=4)
plt.show()

# %% [markdown]
# One sample per family and split, side by side (the green box is the ground truth):

# %%
picked, titles = [], []
for split_name, data in {"train": train, **splits}.items():
    for family in ("attribute", "relation", "position", "comparative"):
        index = next((i for i in range(min(len(data), 400)) if data.expression(i)[1] == family), None)
        if index is not None:
            picked.append(data[index])
            titles.append(f"{split_name} · {family}")
fig = viz.sample_grid(picked, titles=titles, ncols=4)
plt.show()

# %% [markdown]
# Each sample also carries the target's pixel mask (HiVG trains auxiliary segmentation heads on masks) and its symbolic
# scene, from which captions for contrastive pretraining are written (notebook 01 uses them).

# %%
from vgstudy.data.synthref import object_phrase, scene_caption

sample = train[0]
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
viz.show_sample(axes[0], sample.image, sample.text, sample.box_xyxy)
axes[1].imshow(sample.mask, cmap="gray")
axes[1].set_title("target mask", fontsize=8)
axes[1].axis("off")
plt.show()
print("caption:", scene_caption(sample.scene, params.seed))
print("object phrases:", [object_phrase(o) for o in sample.scene.objects])

# %% [markdown]
# ### Statistics
#
# Computed from the symbolic scenes of the training split and the expressions of every split (no rendering needed).


# %%
# NBVAL_CHECK_OUTPUT
def split_statistics(data: SynthRef) -> dict:
    n_objects, words, areas, families = [], [], [], Counter()
    for i in range(len(data)):
        text, family, scene = data.expression(i)
        n_objects.append(len(scene.objects))
        words.append(len(text.split()))
        x1, y1, x2, y2 = scene.objects[scene.target].box_xyxy
        areas.append((x2 - x1) * (y2 - y1) / scene.image_size**2)
        families[family] += 1
    t = torch.tensor
    return {
        "samples": len(data),
        "objects / image": round(t(n_objects, dtype=torch.float).mean().item(), 2),
        "words / expression": round(t(words, dtype=torch.float).mean().item(), 2),
        "target area (% of image)": round(100 * t(areas).mean().item(), 2),
        **{
            f"% {f}": round(100 * families[f] / len(data), 1)
            for f in ("attribute", "relation", "position", "comparative")
        },
        "_n_objects": n_objects,
        "_words": words,
        "_areas": areas,
    }


stats = {name: split_statistics(d) for name, d in {"train": train, **splits}.items()}
header = [k for k in stats["train"] if not k.startswith("_")]
print(f"{'':26s}" + "".join(f"{name:>9s}" for name in stats))
for key in header:
    print(f"{key:26s}" + "".join(f"{stats[name][key]:>9}" for name in stats))

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
axes[0].hist(stats["train"]["_n_objects"], bins=range(2, 9), rwidth=0.8)
axes[0].set_title("objects per image")
axes[1].hist(stats["train"]["_words"], bins=range(1, 16), rwidth=0.8)
axes[1].set_title("words per expression")
axes[2].hist([100 * a for a in stats["train"]["_areas"]], bins=30)
axes[2].set_title("target area, % of image")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · What a model sees: transforms and tokens
#
# Models take a square, normalised image and a token sequence. The transforms are grounding-aware: built on
# `torchvision.transforms.v2` with the box as a `tv_tensors.BoundingBoxes`, so every resize, crop and flip moves the box
# with the pixels. The training pipeline adds a random resize, a crop that keeps the target, colour jitter without hue
# (colours are words here) and an optional flip that also swaps *left* and *right* in the expression.

# %%
from vgstudy.data.transforms import GroundingTransform, TransformConfig

eval_tf = GroundingTransform(TransformConfig(image_size=params.image_size, train=False))
train_tf = GroundingTransform(
    TransformConfig(image_size=params.image_size, train=True, flip_prob=1.0, crop_prob=1.0), params.seed
)
sample = next(s for s in (train[i] for i in range(50)) if "left" in s.text or "right" in s.text)
fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
viz.show_sample(axes[0], sample.image, sample.text, sample.box_xyxy, title="original")
for ax, (name, tf) in zip(
    axes[1:], {"eval transform": eval_tf, "train transform (flip)": train_tf}.items(), strict=True
):
    item = tf(sample)
    size = item["image"].shape[-1]
    box = evaluate.cxcywh_to_xyxy(item["box_cxcywh"]) * size
    mean, std = torch.tensor(tf.config.mean)[:, None, None], torch.tensor(tf.config.std)[:, None, None]
    viz.show_sample(ax, item["image"] * std + mean, item["text"], box, title=name)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
from vgstudy.data import build_tokenizer

text = splits["testB"][0].text
for name, max_len in (("clip", 77), ("bert", 20)):
    tok = build_tokenizer(name, max_len)
    batch = tok([text])
    n = int(batch.mask.sum())
    print(f"{name:5s} vocabulary {tok.vocab_size:6d}  {n} tokens of {max_len}: {batch.ids[0, :n].tolist()}")
    print(f"      decoded: {tok.decode(batch.ids[0, :n])!r}")

# %% [markdown]
# ## 4 · Export → real loader, round trip
#
# The real data sets come as split files `<root>/<dataset>/<dataset>_<split>.pth` — lists of tuples in the format the
# TransVG release defined and HiVG and MaPPER reuse. SynthRef can write itself in that format, so the loader the GPU
# runs use is exercised here end to end: export, read back with `load_split`, compare.

# %%
# NBVAL_CHECK_OUTPUT
original = SynthRef("val", 64, seed=params.seed, image_size=params.image_size)
export_root = original.export(out / "export")
loaded = load_split(export_root, "synthref", "val", image_root=export_root / "images")
same = sum(
    torch.equal(a.image, b.image) and a.text == b.text and torch.allclose(a.box_xyxy, b.box_xyxy, atol=1e-4)
    for a, b in zip((original[i] for i in range(len(original))), (loaded[i] for i in range(len(loaded))), strict=True)
)
print(f"exported {len(original)} samples; read back {len(loaded)}; identical image, text and box: {same}")

# %% [markdown]
# ## 5 · Trivial baselines: the floor
#
# What does a model score without reading the expression? Four baselines answer it, per split:
# - **centre box** — a box of half the image's width and height in the middle (sees nothing);
# - **largest object** — a perfect detector that always picks the largest object;
# - **random object** — a perfect detector that picks an object at random: chance for a model that cannot read;
# - **oracle object, 2x box** — the right object, box twice too large: shows how strict Acc@0.5 is about box size.
#
# Every accuracy in notebooks 01–05 should be read against this table.

# %%
# NBVAL_CHECK_OUTPUT
eval_samples = {name: [d[i] for i in range(len(d))] for name, d in splits.items()}
baselines = {
    baseline: {
        name: evaluate.evaluate_baseline(baseline, samples, seed=params.seed) for name, samples in eval_samples.items()
    }
    for baseline in evaluate.BASELINES
}
print(f"{'Acc@0.5 (%)':24s}" + "".join(f"{name:>8s}" for name in splits))
for baseline, per_split in baselines.items():
    print(f"{baseline:24s}" + "".join(f"{per_split[name]['acc50']:8.1f}" for name in splits))

# %% [markdown]
# ## 6 · The real data sets
#
# The loader knows the six data sets of the papers. Point `data_root` at the folder holding the split files (the
# `data/` folder of the TransVG/HiVG releases) and `image_root` at the images: COCO `train2014` for the RefCOCO family,
# ReferIt's images, or Flickr30k's. Boxes are normalised to x1 y1 x2 y2 pixels whatever the file's convention.

# %%
# NBVAL_CHECK_OUTPUT
from vgstudy.data.refer import DATASETS

print(f"{'name':9s} {'data set':26s} {'tuple':>5s}  {'boxes':5s}  splits")
for name, layout in DATASETS.items():
    print(
        f"{name:9s} {layout.description:26s} {layout.tuple_length:>5d}  {layout.box_format:5s}  {', '.join(layout.splits)}"
    )

# %% [markdown]
# With real data (`dataset="unc"`, `data_root=...`, `image_root=...`), the next cell shows samples and the centre-box
# floor of its evaluation splits; with SynthRef it shows the exported copy through the same code.

# %%
if params.dataset == "synthref":
    real_root, real_images, real_name, real_splits = export_root, export_root / "images", "synthref", ("val",)
else:
    real_root, real_images, real_name = params.data_root, params.image_root, params.dataset
    real_splits = tuple(s for s in DATASETS[real_name].splits if s not in ("train", "trainval"))
for split_name in real_splits:
    data = load_split(real_root, real_name, split_name, image_root=real_images)
    shown = [data[i] for i in range(min(4, len(data)))]
    floor = evaluate.evaluate_baseline("centre box", (data[i] for i in range(min(len(data), params.n_eval))))
    print(f"{real_name} {split_name}: {len(data)} samples; centre-box Acc@0.5 {floor['acc50']:.1f}%")
    viz.sample_grid(shown, ncols=4)
    plt.show()

# %% [markdown]
# ## Verdict
#
# Computed from the tables above.

# %%
# NBVAL_CHECK_OUTPUT
best = {
    name: max(baselines, key=lambda b: baselines[b][name]["acc50"] if b != "oracle object, 2x box" else -1)
    for name in splits
}
for name in splits:
    b = best[name]
    print(
        f"{name}: the strongest expression-blind baseline is '{b}' at {baselines[b][name]['acc50']:.1f}% Acc@0.5; "
        f"a grounding model must beat it to show it reads the expression."
    )
gap = stats["testB"]["words / expression"] - stats["testA"]["words / expression"]
print(
    f"testB expressions are {gap:+.1f} words longer than testA's on average: they name a second object or a position."
)
print(f"round trip through the real loader: {'identical' if same == len(original) else 'DIFFERENT'}")

# %%
results = {
    "notebook": "00_task_and_data",
    "params": as_dict(params),
    "baselines": {b: {s: m for s, m in per.items()} for b, per in baselines.items()},
    "statistics": {s: {k: v for k, v in st.items() if not k.startswith("_")} for s, st in stats.items()},
}
(out / "results.json").write_text(json.dumps(results, indent=2))
print(f"results: {out / 'results.json'}")
