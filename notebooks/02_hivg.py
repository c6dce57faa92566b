# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · HiVG: CLIP, a multi-layer cross-modal bridge, and hierarchical LoRA
#
# **The claim** (Xiao et al., *HiVG*, ACM MM 2024, `papers/references.bib: xiao2024hivg`): grounding built on a
# *multimodal* pretrained model (CLIP) beats grounding built on unimodal backbones, once two gaps between CLIP and the
# task are closed.
#
# 1. **CLIP's features are not what grounding needs.** CLIP was trained to match a whole image with a whole caption;
#    its patch tokens never had to single out *the* object a sentence refers to among similar ones. HiVG injects the
#    expression into several layers of CLIP's image tower with a *multi-layer adaptive cross-modal bridge*, and reads
#    visual features from several layers at once (*multi-level features*).
# 2. **Fine-tuning errors accumulate from shallow to deep layers.** HiVG adapts CLIP with *hierarchical LoRA*
#    (HiLoRA): a warm-up trains the bridge and the head with CLIP frozen, then LoRA opens on the shallow vision blocks
#    first and on deeper ones stage by stage; after each stage its adapter is merged into the weights.
#
# This notebook shows the gap on data, builds the bridge piece by piece, counts what each HiLoRA stage trains, trains
# HiVG through warm-up and stages in the active profile, re-runs the paper's ablations at this scale beside what the
# paper reports, looks at where the trained model attends, and computes a verdict on each claim.

# %% tags=["parameters"]
profile = "tiny"  # tiny | study | paper
seed = 0
device = "cpu"
out_dir = "../runs"  # relative to notebooks/
run_id = None  # default: a timestamp
dataset = "synthref"
data_root = None
image_root = None
image_size = 128
n_train = 96  # SynthRef training samples
n_eval = 100  # samples per evaluation split
model_name = "hivg-tiny"  # paper: hivg-b or hivg-l
stage_epochs = (1, 1, 1, 1)  # warm-up, HiLoRA stages 1-3
stage_lrs = (1e-3, 5e-4, 2.5e-4, 1.25e-4)
batch_size = 16
warmup_steps = 0
text_layout = "fixed"  # fixed (paper) | official (the release)
hilora_merge = True  # paper: True; the release: False
ablations = "bridge-none,frozen"  # or "all", "none"
n_seeds = 1
backbone_lr_scale = 0.1
clip_weights = None

# %%
import json

import matplotlib.pyplot as plt
import torch

import vgstudy
from vgstudy import hivg_study, viz, zoo
from vgstudy.compare import estimate, markdown_table, pooled_accuracy
from vgstudy.config import HiVGParams, resolve_device
from vgstudy.data import GroundingTransform, TransformConfig
from vgstudy.data.transforms import TransformedDataset
from vgstudy.evaluate import box_metrics, cxcywh_to_xyxy
from vgstudy.experiment import baselines, eval_split_names, grounding_data, train_and_evaluate
from vgstudy.hivg_study import Recipe, build_run, compare
from vgstudy.models import build_backbone, describe, hilora, hivg
from vgstudy.notebook import run_dir
from vgstudy.papers import ablation, load_paper, reported
from vgstudy.predict import input_box_to_image
from vgstudy.train import lr_multiplier

params = vgstudy.config.load(locals(), HiVGParams)
vgstudy.seed_everything(params.seed)
out = run_dir(params.out_dir, "02_hivg", params.run_id)
device = resolve_device(params.device)
zoo_profile = "study" if params.profile == "study" else "tiny"
model_dataset = "unc" if params.dataset == "synthref" else params.dataset  # picks the release's text levels
seeds = params.seeds()
print(params)


# %% [markdown]
# What the paper reports (Table 1, Acc@0.5 %, single-data-set fine-tuning), read from `papers/hivg.yaml`:

# %%
# NBVAL_CHECK_OUTPUT
table_1 = [r for r in load_paper("hivg").results if r.id.startswith("main/")]
columns = list(dict.fromkeys((r.dataset, r.split) for r in table_1))
rows = []
for model in dict.fromkeys(r.model for r in table_1):
    values = {(r.dataset, r.split): r.value for r in table_1 if r.model == model}
    rows.append([model] + [f"{values[c]:.2f}" for c in columns])
print(markdown_table(["model"] + [f"{d} {s}" for d, s in columns], rows))
print(f"source: {table_1[0].source}")

# %% [markdown]
# ## 1 · CLIP's gap for grounding, on data
#
# CLIP (here the small CLIP of notebook 01; in the `paper` profile the real ViT) can already say *which patches look
# like* a phrase: the cosine between the expression's embedding and each patch's embedding is a heat map. Grounding
# needs more: the one object the whole expression singles out, often by its relation to other objects or by its
# position. If CLIP's map pointed at the referent, grounding would be nearly solved by it; the *pointing accuracy*
# below (the share of expressions whose most similar patch lies inside the target box, beside the share a random
# patch would hit) measures how far it is, per split (the first `n_eval` expressions of each): on SynthRef, testA is
# resolvable by attributes, testB needs relations and positions.

# %%
train_samples, eval_samples = grounding_data(params)
splits = eval_split_names(params)
if params.profile == "paper":
    clip = build_backbone(hivg.CLIP_BACKBONES[params.model_name], weights=params.clip_weights)
else:
    clip = zoo.pretrained("clip-tiny", profile=zoo_profile, cache_dir=params.out_dir / "zoo")
clip_transform = GroundingTransform(
    TransformConfig(image_size=clip.visual.image_size, mean=clip.visual.mean, std=clip.visual.std)
)


def clip_pointing(samples):
    """CLIP's phrase-patch maps of `samples` and whether each map's best patch lies in the target box."""
    items = [clip_transform(s) for s in samples]
    images = torch.stack([it["image"] for it in items]).to(device)
    maps = zoo.phrase_similarity_maps(clip.to(device), images, [it["text"] for it in items]).cpu()
    return maps, hivg_study.pointing(maps, torch.stack([it["box_cxcywh"] for it in items]))


clip_gap = {}
for split in splits:
    samples = [eval_samples[split][i] for i in range(min(len(eval_samples[split]), params.n_eval))]
    _, hits = clip_pointing(samples)
    clip_gap[split] = {
        "pointing": 100 * hits["hit"].float().mean().item(),
        "chance": 100 * hits["chance"].mean().item(),
        "n": len(samples),
    }
print(
    markdown_table(
        ["split", "CLIP's map points at the referent (%)", "a random patch would (%)", "n"],
        [[s, f"{g['pointing']:.1f}", f"{g['chance']:.1f}", g["n"]] for s, g in clip_gap.items()],
    )
)

# %%
shown_pairs = [(split, i) for split in splits[-2:] for i in range(3)]  # (split, index) of the samples shown
shown = [eval_samples[split][i] for split, i in shown_pairs]
maps, hits = clip_pointing(shown)
fig, axes = plt.subplots(2, len(shown), figsize=(2.6 * len(shown), 6.2))
for k, sample in enumerate(shown):
    viz.show_sample(axes[0, k], sample.image, sample.text, gt_xyxy=sample.box_xyxy.tolist())
    axes[1, k].imshow(maps[k], cmap="magma")
    axes[1, k].set_title(f"best patch in the box: {'yes' if hits['hit'][k] else 'no'}", fontsize=8)
    axes[1, k].set(xticks=[], yticks=[])
plt.suptitle("CLIP's phrase-patch cosine for the whole expression (no grounding training)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · The bridge, piece by piece
#
# HiVG runs CLIP's image tower block by block. Inside some blocks (ViT-B/16: 0, 3, 7, 11; the small tower's indices
# are mapped proportionally and printed), between the block's self-attention and its MLP, a `CrossModalBridge`:
#
# 1. takes the hidden states of some text blocks (the *levels*; the release picks them per data set),
# 2. re-weights each level per token and per channel, $T_l' = W_l \odot T_l + T_l$,
# 3. concatenates the levels and mixes them with a linear gate to the vision width,
# 4. lets the image tokens cross-attend to that text feature and adds a CLIP-style MLP of the result to them.
#
# The outputs of several blocks (the *multi-level features*) are concatenated and projected to the head, where a
# [REG] token reads image and text tokens and regresses the box.

# %%
vgstudy.show_source(hivg.CrossModalBridge)

# %%
# NBVAL_CHECK_OUTPUT
model_options = {"dataset": model_dataset, "text_layout": params.text_layout, "hilora_merge": params.hilora_merge}
recipe = Recipe(params.stage_epochs, params.stage_lrs, params.warmup_steps, params.backbone_lr_scale)
torch.manual_seed(params.seed)
reference = build_run(params.model_name, None, recipe, clip_module=clip, **model_options)[0]
config = reference.config
print(
    f"bridges in vision blocks {config.bridge_layers}, text levels {config.text_levels}, "
    f"multi-level features of blocks {config.feature_layers}"
)

# %% [markdown]
# The same pieces on four expressions of the evaluation set, traced through one forward pass of the reference model
# (the first bridge, the multi-level projection, the head); (B, 1 + N, D): CLS + N patches.

# %%
# NBVAL_CHECK_OUTPUT
demo = [GroundingTransform(reference.transform)(eval_samples[splits[0]][i]) for i in range(4)]
demo_images, demo_texts = torch.stack([it["image"] for it in demo]), [it["text"] for it in demo]
first_bridge = reference.bridges[str(config.bridge_layers[0])]
traced = {
    "text levels -> gate (B, L, Dv)": first_bridge.gate,
    "bridge's cross-attention (B, 1 + N, Dv)": first_bridge.attn,
    "bridge, in its block (B, 1 + N, Dv)": first_bridge,
    "multi-level features -> projection (B, 1 + N, E)": reference.feature_proj,
    "CLIP's text tokens -> projection (B, L, E)": reference.text_proj,
    "head's first layer ([REG] + visual + text)": reference.head.layers[0],
    "[REG] -> box MLP (B, 4)": reference.head.box_mlp,
}
shapes = hivg_study.trace_shapes(reference, traced, demo_images, demo_texts)
print(markdown_table(["piece", "input", "output"], [[k, i, o] for k, (i, o) in shapes.items()]))
print(
    f"\nper-token re-weighting W_l: {len(config.text_levels)} level(s) of (L, Dt) = {tuple(first_bridge.level_weights.shape[1:])}"
)
print(
    f"head tokens: [REG] + {reference.num_visual_tokens} visual + {reference.num_text_tokens} text = {1 + reference.head.num_tokens}"
)

# %% [markdown]
# ## 3 · HiLoRA: what each stage trains
#
# The schedule is data (`HILORA_SCHEDULE`): a warm-up, then three stages that open LoRA on a growing share of the
# vision blocks from the first (ViT-B/16: blocks 0-4, 0-7, 0-11), with the text tower's LoRA in every stage. The
# model switches at each stage start (`HiVG.enter_stage`, called by the Trainer): with `hilora_merge` (paper) the
# finished stage's adapter is merged into the weights and a fresh one is injected. The ablations swap the schedule for
# vanilla LoRA (every block from stage 1), full fine-tuning or a frozen CLIP, keeping the stage names, epochs and
# learning rates (`hivg_study.tuning_schedule`).

# %%
vgstudy.show_source(hivg.HiVG.enter_stage)

# %%
# NBVAL_CHECK_OUTPUT
by_stage = reference.trainable_by_stage()
counts = {
    tuning: hivg_study.trainable_counts(reference, hivg_study.tuning_schedule(tuning)) for tuning in hivg_study.TUNINGS
}
print()
print(
    markdown_table(
        ["CLIP adapted by"] + [s.name for s in hilora.HILORA_SCHEDULE],
        [[tuning] + [f"{n:,}" for n in per_stage.values()] for tuning, per_stage in counts.items()],
    )
)
parts = describe(reference)["parts"]
print()
print(
    markdown_table(
        ["part", "parameters", "trainable in the warm-up"],
        [[k, f"{v['total']:,}", f"{v['trainable']:,}"] for k, v in parts.items()],
    )
)
release = {m: reported("hivg", f"params/hivg-b/unc/{m}") for m in ("total", "trainable")}
print(
    f"\nHiVG-B as released (RefCOCO, after stage 3): {release['total'].value:,.0f} parameters, "
    f"{release['trainable'].value:,.0f} trainable ({release['total'].source}, unverified)"
)

# %% [markdown]
# ## 4 · Training through the warm-up and the HiLoRA stages
#
# The reference run: HiVG as the paper describes it, trained with HiVG's losses (`HiVGCriterion`: L1 and GIoU on the
# box, CLIP's contrastive loss, patch-text alignment and mask focal + dice), in the active profile's stages. Each
# seed trains a fresh model on the same data.

# %%
# NBVAL_IGNORE_OUTPUT
runs = {}


def train_runs(name, ablation_spec):
    """Train the reference (ablation_spec None) or one ablation once per seed; their results, in `runs[name]`."""
    runs[name] = []
    for run_seed in seeds:
        torch.manual_seed(run_seed)
        model, stages, criterion = build_run(
            params.model_name, ablation_spec, recipe, reference=config, clip_module=clip, **model_options
        )
        # the card (name + overrides) lets `python -m vgstudy predict --checkpoint <run folder>` rebuild the model;
        # the checkpoint holds every weight, CLIP's included (a tuning ablation's schedule differs only in what trains)
        overrides = {**model_options, **(ablation_spec.overrides(config) if ablation_spec else {})}
        result = train_and_evaluate(
            model,
            train_samples,
            eval_samples,
            out / name / f"seed-{run_seed}",
            stages=stages,
            batch_size=params.batch_size,
            seed=run_seed,
            device=device,
            criterion=criterion,
            params={"run": name, **vgstudy.config.as_dict(params)},
            model_card=(params.model_name, overrides),
        )
        runs[name].append(result)
        print(f"{name}, seed {run_seed}: {result['steps']} steps in {result['train_time_s']:.0f} s")
    return model


trained = train_runs("HiVG", None)

# %%
log = [json.loads(line) for line in (out / "HiVG" / f"seed-{seeds[0]}" / "log.jsonl").read_text().splitlines()]
train_log = [r for r in log if r["kind"] == "train"]
starts = [r for r in log if r["kind"] == "stage"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
terms = [k for k in train_log[0] if k not in ("kind", "step", "epoch", "stage", "lr", "samples_per_s", "time")]
for term in terms:
    axes[0].plot(
        [r["step"] for r in train_log], [r[term] for r in train_log], label=term, lw=2 if term == "loss" else 1
    )
axes[0].set(xlabel="step", ylabel="loss (terms unweighted)", yscale="log", title="HiVG's losses, first seed")
axes[0].legend(fontsize=7, ncol=2)
# the learning rate at every optimiser step, from the stages themselves (the log has a line every few steps)
steps_per_epoch = runs["HiVG"][0]["steps"] // sum(params.stage_epochs)
step, lr_steps, lr_values = 0, [], []
for stage in hilora.trainer_stages(
    hilora.HILORA_SCHEDULE, params.stage_epochs, params.stage_lrs, warmup_steps=params.warmup_steps
):
    total = steps_per_epoch * stage.epochs
    lr_steps += [step + k + 1 for k in range(total)]
    lr_values += [stage.lr * lr_multiplier(stage, k, total) for k in range(total)]
    step += total
axes[1].plot(lr_steps, lr_values, marker=".")
axes[1].set(xlabel="step", ylabel="learning rate", title="each stage's warm-up and cosine schedule")
for ax in axes:
    for start in starts:
        ax.axvline(start["step"], color="grey", ls=":")
        ax.text(start["step"], ax.get_ylim()[1], f" {start['stage']}\n {start['trainable']:,}", va="top", fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5 · The paper's ablations, re-run at this scale
#
# Each ablation replaces one of HiVG's choices and trains with the same stages, data and seeds as the reference
# (the active profile runs those named in `ablations`; the `study` profile runs all of them with three seeds).

# %%
print(
    markdown_table(
        ["ablation", "HiVG's choice", "replaced by"],
        [[a.name, a.choice, a.setting] for a in hivg_study.ABLATIONS.values()],
    )
)

# %%
# NBVAL_IGNORE_OUTPUT
for name in params.ablation_list():
    train_runs(name, hivg_study.ABLATIONS[name])

# %% [markdown]
# Acc@0.5 (%) per split and over all splits (mean ± standard deviation over seeds when there are several), the
# difference to the reference with its margin (two standard errors of the difference; each accuracy's error joins the
# evaluation set's binomial error and the spread between seeds, `vgstudy.compare.Estimate`), beside the trivial
# baselines. The paper's ablation tables are **not recorded** in `papers/hivg.yaml` (its notes say why), so no
# reported number stands beside these rows.

# %%
floors = baselines(eval_samples, seed=params.seed)
floor_pooled = {  # each baseline over all splits, weighted by their sizes as the runs' "all splits" are
    b: pooled_accuracy({s: {"acc50": floors[b][s], "n": len(eval_samples[s])} for s in splits}, splits)[0]
    for b in floors
}
best_floor = max(floor_pooled, key=floor_pooled.get)


def accuracies(name, split=None):
    """Per-seed Acc@0.5 of a run on one split, or over all splits."""
    if split is None:
        return [pooled_accuracy(r["metrics"], splits)[0] for r in runs[name]]
    return [r["metrics"][split]["acc50"] for r in runs[name]]


def accuracy_of(name, split=None):
    """The run's accuracy over its seeds (`vgstudy.compare.Estimate`: mean, std, seeds, n)."""
    return estimate(accuracies(name, split), pooled_accuracy(runs[name][0]["metrics"], [split] if split else splits)[1])


n_pooled = pooled_accuracy(runs["HiVG"][0]["metrics"], splits)[1]
comparisons = {name: compare(accuracies("HiVG"), accuracies(name), n_pooled) for name in runs if name != "HiVG"}
rows = []
for name in runs:
    delta = "–" if name == "HiVG" else f"{comparisons[name]['difference']:+.1f} (± {comparisons[name]['margin']:.1f})"
    rows.append([name] + [str(accuracy_of(name, s)) for s in splits] + [str(accuracy_of(name)), delta])
rows += [[f"baseline: {b}"] + [f"{floors[b][s]:.1f}" for s in splits] + [f"{floor_pooled[b]:.1f}", ""] for b in floors]
print(markdown_table(["run"] + list(splits) + ["all splits", "HiVG minus run"], rows))

# %%
fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs)), 3.6))
means = [accuracy_of(name).mean for name in runs]
spreads = [accuracy_of(name).std for name in runs]
ax.bar(range(len(runs)), means, yerr=spreads, color=["C3"] + ["C0"] * (len(runs) - 1), capsize=3)
ax.axhline(floor_pooled[best_floor], color="k", ls="--", label=f"baseline: {best_floor}")
ax.set_xticks(range(len(runs)), list(runs), rotation=30, ha="right")
ax.set(ylabel="Acc@0.5 over all splits (%)", title="HiVG and its ablations")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6 · The release's text layout
#
# The release lays the bridge's text out as (L, B, D) and its attention then reads that buffer as (B, L, D), so
# with more than one sample in a batch each image attends to a mixture of the batch's words (and no text padding is
# masked). The switch `text_layout` reproduces it. On the trained reference model, a batch of eight samples: how far sample
# 0's box moves when its own expression changes (how much the model follows its words at all), and when only the
# *other* samples' expressions change (which must not move it).

# %%
# NBVAL_IGNORE_OUTPUT
eval_transform = GroundingTransform(trained.transform)
pool = [eval_samples[s][i] for s in splits for i in range(min(16, len(eval_samples[s])))]
size = min(8, len(pool) // 2)  # a batch, and as many other expressions
if size < 2:
    raise vgstudy.ConfigError(f"the text-layout probe needs 4 evaluation samples or more, got {len(pool)}")
probe = [eval_transform(sample) for sample in pool[: 2 * size]]
probe_images = torch.stack([it["image"] for it in probe[:size]]).to(device)
probe_texts = [it["text"] for it in probe[:size]]
others = [it["text"] for it in probe[size:]]
own_changed = others[:1] + probe_texts[1:]  # sample 0 reads another expression, the rest of the batch as is
others_changed = probe_texts[:1] + others[1:]  # sample 0 as is, the rest of the batch not
movement = {}
for layout in ("fixed", "official"):
    with hivg_study.text_layout(trained, layout):
        movement[layout] = {
            "own": hivg_study.box_shift(trained, probe_images, probe_texts, own_changed)[0].item(),
            "others": hivg_study.box_shift(trained, probe_images, probe_texts, others_changed)[0].item(),
        }
print(
    markdown_table(
        ["layout", "sample 0's box moves when its own text changes", "... when only the others' texts change"],
        [[layout, f"{m['own']:.2e}", f"{m['others']:.2e}"] for layout, m in movement.items()],
    )
)

# %% [markdown]
# ## 7 · Where HiVG looks
#
# Predictions of the trained reference model (red, dashed) against the ground truth (green), and below each the
# [REG] token's attention over the image patches in the head's last layer (averaged over heads; read with a forward
# hook, `hivg_study.reg_attention`). The same pointing test as CLIP's maps above: does the most attended patch lie in
# the target box?

# %%
vgstudy.show_source(hivg_study.reg_attention)

# %%
looked = {
    split: hivg_study.attention_over(
        trained, TransformedDataset(eval_samples[split], eval_transform), batch_size=params.batch_size, device=device
    )
    for split in splits
}
# on the expressions CLIP's maps were scored on (the first n_eval of each split)
attention_hits = {s: 100 * found["hit"][: clip_gap[s]["n"]].float().mean().item() for s, found in looked.items()}
print(
    markdown_table(
        ["split", "[REG] attention points at the referent (%)", "CLIP's map does (%)", "a random patch would (%)"],
        [
            [s, f"{attention_hits[s]:.1f}", f"{clip_gap[s]['pointing']:.1f}", f"{clip_gap[s]['chance']:.1f}"]
            for s in splits
        ],
    )
)

# %%
fig, axes = plt.subplots(2, len(shown_pairs), figsize=(2.6 * len(shown_pairs), 5.8))
for k, (split, index) in enumerate(shown_pairs):
    sample = eval_samples[split][index]
    found = looked[split]
    predicted = input_box_to_image(found["boxes_cxcywh"][index], tuple(sample.image.shape[-2:]), trained.transform)
    viz.show_sample(axes[0, k], sample.image, sample.text, sample.box_xyxy.tolist(), predicted.tolist(), split)
    axes[1, k].imshow(found["maps"][index], cmap="viridis")
    axes[1, k].set_title("[REG] attention, last head layer", fontsize=8)
    axes[1, k].set(xticks=[], yticks=[])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 8 · Beside the paper
#
# The paper reports HiVG-B on RefCOCO (and on the other data sets, table above) and, in Figure 4(c), its accuracy by
# the length of the expression on RefCOCOg. The same breakdown for the reference run, pooled over the splits (a
# different data set and scale: for the shape of the curve, not for the level).

# %%
fig4c = ablation("hivg", "fig4c/text-length/hivg-b")
buckets = [row.setting for row in fig4c.rows]
texts = [eval_samples[s][i].text for s in splits for i in range(len(eval_samples[s]))]
pred_xyxy = cxcywh_to_xyxy(torch.cat([looked[s]["boxes_cxcywh"] for s in splits]))
target_xyxy = cxcywh_to_xyxy(torch.cat([looked[s]["targets_cxcywh"] for s in splits]))
by_length = {}
for bucket in buckets:
    index = torch.tensor(
        [i for i, t in enumerate(texts) if hivg_study.length_bucket(t, buckets) == bucket], dtype=torch.long
    )
    by_length[bucket] = box_metrics(pred_xyxy[index], target_xyxy[index]) if len(index) else None
rows = [
    [
        b,
        "–" if by_length[b] is None else f"{by_length[b]['acc50']:.1f}",
        0 if by_length[b] is None else by_length[b]["n"],
        f"{fig4c.value(b):.1f}",
    ]
    for b in buckets
]
print(
    markdown_table(
        ["words", "HiVG here (Acc@0.5 %)", "n", f"HiVG-B, {fig4c.dataset} {fig4c.split} ({fig4c.source})"], rows
    )
)
# Table 1's numbers for this model on this data set's splits (none on SynthRef)
main_results = {r.id: r for r in table_1}
paper_rows = {
    s: main_results[f"main/{params.model_name}/{params.dataset}/{s}"]
    for s in splits
    if f"main/{params.model_name}/{params.dataset}/{s}" in main_results
}
if paper_rows:
    print(
        markdown_table(
            ["split", "here", "reported"],
            [[s, str(accuracy_of("HiVG", s)), f"{r.value:.2f} ({r.source})"] for s, r in paper_rows.items()],
        )
    )

# %% [markdown]
# ## 9 · Verdicts, computed
#
# Each claim is checked against the numbers above. A comparison between runs *holds* when the reference beats the
# variant by more than the margin (two standard errors of the difference), is *reversed* when the variant wins by
# more than it, and is *unresolved* otherwise: at the `tiny` budget most differences are smaller than the evaluation
# noise, and an unresolved verdict says exactly that.

# %%
verdicts = {
    f"HiVG beats the best trivial baseline ({best_floor})": compare(
        accuracies("HiVG"), [floor_pooled[best_floor]], n_pooled
    )["outcome"],
}
for split in splits:
    gap = clip_gap[split]
    verdicts[f"CLIP's zero-shot map points at the referent more often than a random patch ({split})"] = compare(
        [gap["pointing"]], [gap["chance"]], gap["n"]
    )["outcome"]
    verdicts[f"HiVG's [REG] attention points at the referent more often than CLIP's map ({split})"] = compare(
        [attention_hits[split]], [gap["pointing"]], gap["n"]
    )["outcome"]
for name, result in comparisons.items():
    a = hivg_study.ABLATIONS[name]
    verdicts[f"{a.choice} beats {a.setting}"] = result["outcome"]
# float32 noise of a forward pass is ~1e-7 in box coordinates; a shift above 1e-6 is the model's own doing
shifted = {layout: m["others"] for layout, m in movement.items()}
verdicts["fixed layout: a prediction does not depend on the rest of its batch"] = (
    "holds" if shifted["fixed"] < 1e-6 else "reversed"
)
verdicts["official layout: a prediction depends on the rest of its batch"] = (
    "holds" if shifted["official"] > 1e-6 else "reversed"
)
for claim, outcome in verdicts.items():
    print(f"{outcome:>10}  {claim}")

accuracy = {}  # {run: {split or "all": {"mean", "std"}}} over seeds
for name in runs:
    accuracy[name] = {}
    for s in (*splits, None):
        found = accuracy_of(name, s)
        accuracy[name][s or "all"] = {"mean": found.mean, "std": found.std}
written = (out / "results.json").write_text(
    json.dumps(
        {
            "notebook": "02_hivg",
            "params": vgstudy.config.as_dict(params),
            "accuracy": accuracy,
            "runs": {
                name: [
                    {"seed": r["seed"], "metrics": r["metrics"], "steps": r["steps"], "parameters": r["parameters"]}
                    for r in results
                ]
                for name, results in runs.items()
            },
            "comparisons": comparisons,
            "baselines": floors,
            "clip_gap": clip_gap,
            "reg_attention_pointing": attention_hits,
            "layout_movement": movement,
            "trainable_by_stage": counts,
            "verdicts": verdicts,
            # for `python -m vgstudy report`: which reported number each of ours stands beside
            "reported": {f"accuracy.HiVG.{s}.mean": f"hivg:{r.id}" for s, r in paper_rows.items()},
        },
        indent=2,
        default=str,
    )
)

# %% [markdown]
# ## What this shows
#
# The verdicts above are the measured outcome at this profile's budget, not the paper's. In the `tiny` profile each
# run is a few dozen optimiser steps on a CPU, and `benchmarks/grounding_diagnosis.py` measured that the shared
# grounding head needs thousands of steps to learn text-conditioned selection even from perfect token features: at
# this budget the differences between the reference and its ablations are expected to stay inside the margins
# (*unresolved*), and the first verdict says whether HiVG cleared the trivial baselines at all. What does not depend
# on the budget is shown exactly: the bridge's shapes, what each HiLoRA stage trains, and whether a prediction depends
# on the rest of its batch under each text layout. The claims about accuracy are tested by the `study` profile
# (`notebooks/params/02-study.yaml`: every ablation, three seeds, longer stages on more data) and, on the real data
# sets with the real CLIP, by the `paper` profiles (`notebooks/params/02-paper-<dataset>.yaml`, the release's recipe).
