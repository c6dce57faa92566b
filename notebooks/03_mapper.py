# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · MaPPER: prior-guided adapters on frozen DINOv2 and BERT
#
# **The claim** (Liu et al., *MaPPER: Multimodal Prior-guided Parameter Efficient Tuning for Referring Expression
# Comprehension*, EMNLP 2024, arXiv 2409.13609). Fine-tuning both backbones of a grounding model is costly and can
# wash out what they learned in pretraining, and the generic parameter-efficient methods (Adapter, LoRA, AdaptFormer)
# miss two things grounding needs: *local* visual detail and *vision-language alignment* in the text encoder. MaPPER
# keeps DINOv2 and BERT frozen and adds three small modules:
#
# - **LoCA** (Local Convolution Adapter), beside the MLP of three DINOv2 blocks: a bottleneck whose middle runs 1x1 and
#   3x3 convolutions over the patch grid, so each patch sees its neighbours;
# - **DyPA** (Dynamic Prior Adapter), beside the FFN of three BERT layers: a bottleneck whose output each token scales
#   by a number computed from an *aligned prior*, CLIP's text features of the same expression;
# - **PGT** (Prior-Guided Text): BERT's output tokens concatenated with the prior and projected back.
#
# The paper reports that this beats full fine-tuning with **1.41%** of the backbone parameters tunable (its Figure 1).
#
# This notebook counts the tunable parameters exactly, builds each module and shows what it does on real tensors,
# trains the paper's Figure 1 comparison and ablations at the active profile's scale beside the reported numbers
# (`papers/mapper.yaml`), measures training memory and step time per variant, and computes a verdict on each claim.

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
n_train = 128  # SynthRef training samples
n_eval = 40  # samples per evaluation split
variants = "full,adapter,lora,adaptformer,frozen,dypa,loca,pgt,mapper,no-prior,release"
n_seeds = 1  # training seeds per variant
epochs = 1
batch_size = 16
lr = 5e-4
backbone_lr_scale = 0.1
schedule = "cosine"
lr_drop = 60
warmup_steps = 2
max_len = 20
visual_backbone = "dinov2:vit_base_patch14_dinov2"
visual_weights = None
text_weights = None
prior_weights = None

# %%
import json

import matplotlib.pyplot as plt
import torch

import vgstudy
from vgstudy import mapper_study, viz, zoo
from vgstudy.compare import markdown_table
from vgstudy.config import MaPPERParams
from vgstudy.data import GroundingTransform, TransformConfig
from vgstudy.data.transforms import TransformedDataset, collate
from vgstudy.evaluate import cxcywh_to_xyxy, predict_boxes
from vgstudy.experiment import baselines, eval_split_names, grounding_data, train_and_evaluate
from vgstudy.mapper_study import TrainingMemory, build_variant, compare
from vgstudy.models import build_backbone, describe
from vgstudy.models import mapper as mapper_method
from vgstudy.models.mapper import (
    DynamicPriorAdapter,
    LocalConvAdapter,
    PriorGuidedText,
    ViTBlockWithParallelAdapter,
    map_positions,
)
from vgstudy.models.petl import BottleneckAdapter
from vgstudy.notebook import run_dir
from vgstudy.papers import ablation, reported
from vgstudy.predict import input_box_to_image
from vgstudy.train import Stage

params = vgstudy.config.load(locals(), MaPPERParams)
vgstudy.seed_everything(params.seed)
out = run_dir(params.out_dir, "03_mapper", params.run_id)
size = "b" if params.profile == "paper" else "tiny"
zoo_profile = "study" if params.profile == "study" else "tiny"
print(params)


# %% [markdown]
# ## 1 · Why frozen backbones: what is tuned, and what training holds in memory
#
# The paper's headline is a count: 1.41% of the backbone parameters tunable. Below, the full-size models are built
# with the paper's shapes (DINOv2 ViT-B/14 at 518 px and BERT-base on the `meta` device, which has shapes and no
# values; CLIP ViT-B/16's text tower, the prior, with random values) and counted. The per-module breakdown is the
# paper's accounting: what sits inside the backbones (LoCA, DyPA) plus PGT, over DINOv2 + BERT. The release also
# counts, in each DyPA, a projection of the prior that its forward pass never uses; `fidelity="paper"` leaves it out.

# %%
# NBVAL_CHECK_OUTPUT
with torch.device("meta"):  # shapes only: counting needs no values
    full_size = {
        "visual_module": build_backbone("dinov2:vit_base_patch14_dinov2"),
        "text_module": build_backbone("bert:base"),
    }
# open_clip cannot build on meta: CLIP ViT-B/16 with random values; MaPPER takes (a copy of) its text tower
full_size["prior_module"] = build_backbone("clip:ViT-B-16-quickgelu", max_len=20).text
full_builds = {name: (name, {}) for name in mapper_study.FIGURE1}
full_builds["mapper (release accounting)"] = ("mapper", {"unused_prior_projection": True})
full_counts = {}
for name, (variant, overrides) in full_builds.items():
    model = build_variant(variant, "b", **full_size, **overrides)
    count = model.tunable_count()
    full_counts[name] = {
        "count": count,
        "trainable": describe(model)["trainable"],
        "bytes": mapper_study.state_bytes(model),
        "figure1": mapper_study.VARIANTS[variant].figure1 if not overrides else None,
    }
    if variant == "mapper":
        print(f"{name}:\n{count}\n")
del model, full_size  # the full-size models are only counted

# %% [markdown]
# Every method of the paper's Figure 1 at full size: the tunable backbone parameters (what Figure 1's x axis counts),
# beside Figure 1's own values, and what a training run holds for the parameters in fp32: the weights of everything
# (the prior included) plus, for each *trainable* parameter (fusion and head included), its gradient and AdamW's two
# moments. Full fine-tuning has to keep three extra copies of both backbones; the adapters keep three copies of a few
# million parameters. (Activations come on top; section 6 measures them.) Our PETL baselines are sized near MaPPER's
# budget (`vgstudy.models.petl`); Figure 1's are larger.

# %%
# NBVAL_CHECK_OUTPUT
figure1_params = ablation("mapper", "fig1/petl/tunable-params")
full_rows = []
for name, counted in full_counts.items():
    count, state, setting = counted["count"], counted["bytes"], counted["figure1"]
    full_rows.append(
        [
            name,
            f"{count.tunable:,}",
            f"{100 * count.share:.2f}%",
            f"{figure1_params.value(setting):g} M" if setting else "–",
            f"{state['weights'] / 2**30:.2f}",
            f"{state['optimiser'] / 2**30:.2f}",
        ]
    )
print(f"backbones (DINOv2-B/14 + BERT-base): {full_counts['mapper']['count'].backbone:,} parameters\n")
header = ["method", "tunable backbone params", "of backbones", f"{figure1_params.source} (reported)"]
print(markdown_table([*header, "weights GiB", "grads + AdamW GiB"], full_rows))
reported_share = reported("mapper", "params/mapper/trainable_pct")
print(f"\nreported: {reported_share.value}% tunable ({reported_share.source})")

# %% [markdown]
# ## 2 · The modules, one at a time
#
# The small profiles use the same architecture on small backbones: the zoo's DINOv2-style ViT (`vit-tiny`, 6 blocks,
# width 192, 8 x 8 patches at 128 px), the pretrained 6-layer MiniLM as BERT, and the zoo's small CLIP (`clip-tiny`)
# whose text tower gives the prior. The paper's positions, blocks 3, 7 and 11 of 12, map to the same relative depths
# of the small backbones.

# %%
# The backbones are built once; every variant gets its own copy (adapters go inside the copy).
if params.profile != "paper":
    pretrained = {
        name: zoo.pretrained(name, profile=zoo_profile, cache_dir=params.out_dir / "zoo")
        for name in ("vit-tiny", "clip-tiny")
    }
    prior_clip = pretrained["clip-tiny"]
    visual = pretrained["vit-tiny"]
    text = build_backbone("bert:minilm", max_len=params.max_len)
    card_options = {"max_len": params.max_len}  # a run's model card: the checkpoint holds every weight
else:
    prior_clip = build_backbone("clip:ViT-B-16-quickgelu", weights=params.prior_weights, max_len=params.max_len)
    visual = build_backbone(params.visual_backbone, weights=params.visual_weights, image_size=params.image_size)
    text = build_backbone("bert:base", weights=params.text_weights, max_len=params.max_len)
    card_options = {"visual": params.visual_backbone, "image_size": params.image_size, "max_len": params.max_len}
modules = {"visual_module": visual, "text_module": text, "prior_module": prior_clip, "max_len": params.max_len}


def build_model(name: str):
    """The variant `name` for the active profile (tiny/study: the zoo's backbones; paper: the local weights)."""
    return build_variant(name, size, **modules)


# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(params.seed)
mapper = build_model("mapper")
map_positions(mapper_method.PAPER_POSITIONS, mapper.visual.depth, name="LoCA, DINOv2 blocks")
map_positions(mapper_method.PAPER_POSITIONS, mapper.text.depth, name="DyPA, BERT layers")
print(f"\n{mapper.tunable_count()}")

# %% [markdown]
# ### LoCA: a local receptive field
#
# LoCA projects every token down, lays the patch tokens out on their grid, runs a 1x1 branch and a 1x1 → 3x3 branch,
# adds the result to the projection and projects back up. A token-wise adapter (Adapter, AdaptFormer) changes each
# patch from that patch alone; LoCA's 3x3 convolution lets each patch read its neighbours. Below: change one patch's
# input and see which patches' outputs move — for the first LoCA of the model above and for a bottleneck adapter of
# the same width.

# %%
vgstudy.show_source(LocalConvAdapter)

# %%
loca = next(b.adapter for b in mapper.visual.blocks if isinstance(b, ViTBlockWithParallelAdapter))
grid_hw, width, cell = mapper.visual.grid_hw, mapper.visual.width, (3, 4)
bottleneck = BottleneckAdapter(width, loca.down.out_features)
torch.nn.init.normal_(bottleneck.up.weight, std=0.02)  # starts at zero: give it weights to show its reach
prefix = mapper.visual.num_prefix_tokens
influence = {
    "LoCA": mapper_study.token_influence(loca, grid_hw, width, cell, prefix=prefix),
    "bottleneck adapter": mapper_study.token_influence(bottleneck, grid_hw, width, cell, prefix=prefix),
}
fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
for ax, (name, moved) in zip(axes, influence.items(), strict=True):
    shown_map = ax.imshow(torch.log10(moved + 1e-6), cmap="viridis", vmin=-6)  # log: the neighbours are small
    ax.scatter([cell[1]], [cell[0]], marker="x", color="red")
    ax.set(title=name, xticks=[], yticks=[])
    fig.colorbar(shown_map, ax=ax, fraction=0.046, label="log10 change")
fig.suptitle(f"output change per patch when patch {cell} changes (red x)")
plt.tight_layout()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
for name, moved in influence.items():
    print(f"{name}: {int((moved > 1e-6).sum())} of {moved.numel()} patches move")

# %% [markdown]
# ### DyPA: a scale per token, from the prior
#
# DyPA is a bottleneck beside BERT's FFN whose output is multiplied, token by token, by
# s = ReLU(Linear(LN(prior))): the prior decides how much each word's adapter speaks. The prior is CLIP's text tower
# run on the same expression with CLIP's own tokeniser; DyPA pairs them *by position*, so BERT's i-th WordPiece token
# is scaled by the prior of CLIP's i-th BPE token. On SynthRef's vocabulary the two tokenisations line up word for
# word (below); on real expressions a word split differently by the two tokenisers shifts the pairing — the paper
# does not discuss it. (The release sidesteps it differently: it feeds BERT's ids to CLIP, section 2's last part.)

# %%
vgstudy.show_source(DynamicPriorAdapter)

# %%
# NBVAL_CHECK_OUTPUT
shown_texts = ["the red circle left of the blue star", "the second triangle from the top"]
scales_before = mapper_study.dypa_token_scales(mapper, shown_texts)
for item in scales_before:
    print(
        markdown_table(
            ["position", "BERT token", "prior token"],
            [
                [i, b, item.prior_tokens[i] if i < len(item.prior_tokens) else "–"]
                for i, b in enumerate(item.bert_tokens)
            ],
        ),
        "\n",
    )


# %%
def plot_scales(items, title):
    fig, axes = plt.subplots(1, len(items), figsize=(6 * len(items), 2.8), squeeze=False)
    for ax, item in zip(axes[0], items, strict=True):
        n_layers = len(item.scales)
        for k, (layer, values) in enumerate(item.scales.items()):
            positions = [i + (k - (n_layers - 1) / 2) * 0.8 / n_layers for i in range(len(values))]
            ax.bar(positions, values, width=0.8 / n_layers, label=layer)
        ax.set_xticks(range(len(item.bert_tokens)), item.bert_tokens, rotation=45, ha="right", fontsize=8)
        ax.set(ylabel="DyPA scale s", title=f'"{item.text}"')
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    plt.tight_layout()
    plt.show()


plot_scales(scales_before, "DyPA's per-token scales before training")

# %% [markdown]
# ### PGT: BERT's tokens, concatenated with the prior
#
# The last module is one linear layer on [BERT token ; prior] per position, back to BERT's width; the fusion reads
# its output instead of BERT's.

# %%
vgstudy.show_source(PriorGuidedText)

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    batch = mapper.text.tokenize(shown_texts)
    prior = mapper.prior_features(shown_texts, batch)
    bert_tokens = mapper._text_tokens(batch, prior)
    guided = mapper.pgt(bert_tokens, prior)
print(f"BERT tokens {tuple(bert_tokens.shape)} + prior {tuple(prior.shape)} -> PGT {tuple(guided.shape)}")
print(f"PGT: {sum(p.numel() for p in mapper.pgt.parameters()):,} parameters")

# %% [markdown]
# ### The prior as the paper describes it and as the release computes it
#
# The prior is meant to be *aligned*: CLIP's text features sit close to the image features of what the text names.
# The release computes it differently (`vgstudy.models.mapper.ReleaseDeviations`, each checked by a unit test): CLIP's
# text blocks are never loaded (random and frozen), and CLIP reads BERT's WordPiece ids instead of its own tokens. Is
# the release's prior still aligned? For each validation expression, take the prior at its end token (where CLIP pools
# its text embedding), find the CLIP patch embedding closest to it, and count how often that patch lies on the
# referred object (*pointing accuracy*), beside the chance of a random patch.

# %%
train_samples, eval_samples = grounding_data(params)
splits = eval_split_names(params)
first = splits[0]
clip_size = prior_clip.visual.image_size
clip_transform = GroundingTransform(
    TransformConfig(image_size=clip_size, mean=prior_clip.visual.mean, std=prior_clip.visual.std)
)
pointing_samples = [sample for split in splits for sample in eval_samples[split]][:128]
items = [clip_transform(sample) for sample in pointing_samples]
pointing_texts = [it["text"] for it in items]
with torch.no_grad():
    _, patches = zoo.image_and_patch_embeddings(prior_clip, torch.stack([it["image"] for it in items]))
boxes_xyxy = cxcywh_to_xyxy(torch.stack([it["box_cxcywh"] for it in items])) * clip_size
inside = mapper_study.cells_inside(boxes_xyxy, prior_clip.visual.grid_hw, clip_size)
torch.manual_seed(params.seed)
release_model = build_model("release")
prior_pointing = {
    name: mapper_study.prior_pointing(model, patches, pointing_texts, inside)
    for name, model in (("paper", mapper), ("release", release_model))
}
del release_model
print(
    markdown_table(
        ["prior", f"pointing accuracy on {len(items)} expressions (%)", "chance (%)"],
        [[name, f"{v['accuracy']:.1f}", f"{v['chance']:.1f}"] for name, v in prior_pointing.items()],
    )
)

# %% [markdown]
# ## 3 · Training every variant
#
# The grid below repeats the paper's Figure 1 (full fine-tuning and three generic PETL methods on the same frozen
# backbones, against MaPPER) and its ablations (each module added alone to the frozen backbones; the prior removed;
# the release's fidelity). Every variant has the same fusion and head and the same data, seed and schedule; inside the
# backbones (adapters, LoRA, fine-tuned weights) the learning rate is `backbone_lr_scale` × `lr`, as in the release
# (1e-5 against 1e-4). `variants` chooses which run and `n_seeds` how many seeds each; the `study` profile runs all of
# them with three seeds.
#
# Each run's training memory is measured while it trains (`TrainingMemory`): the weights, the gradients and AdamW's
# two moments of the trainable parameters (their bytes), plus the largest set of tensors autograd holds for one
# backward pass, counted as they are saved (each storage once). On CUDA the allocator's peak is measured as well.
# Step time is the training wall time per optimiser step, data loading included.

# %%
# NBVAL_CHECK_OUTPUT
chosen = params.variant_list()
print(
    markdown_table(
        ["variant", "what", "runs"],
        [[v.name, v.label, "yes" if v.name in chosen else "–"] for v in mapper_study.VARIANTS.values()],
    )
)

# %%
# NBVAL_IGNORE_OUTPUT
floors = baselines(eval_samples, seed=params.seed)
scale = {"visual.": params.backbone_lr_scale, "text.": params.backbone_lr_scale}
milestones = (params.lr_drop / params.epochs,) if params.schedule == "step" else ()
stage = Stage(
    "train",
    epochs=params.epochs,
    lr=params.lr,
    lr_scale=scale,
    schedule=params.schedule,
    warmup_steps=params.warmup_steps,
    step_milestones=milestones,
)
runs = {name: [] for name in chosen}
measured = {name: [] for name in chosen}
tunable = {}
trained_mapper = None
for run_seed in params.seeds():
    for name in chosen:
        torch.manual_seed(run_seed)
        model = build_model(name)
        tunable[name] = {"backbone": model.tunable_count().tunable, "trainable": describe(model)["trainable"]}
        with TrainingMemory(model) as meter:
            result = train_and_evaluate(
                model,
                train_samples,
                eval_samples,
                out / name / f"seed-{run_seed}",
                stages=(stage,),
                batch_size=params.batch_size,
                seed=run_seed,
                device=params.device,
                params={"variant": name, "run_seed": run_seed, **vgstudy.config.as_dict(params)},
                model_card=mapper_study.model_card(name, size, **card_options),
            )
        memory = mapper_study.training_memory(model, meter)
        step_s = result["train_time_s"] / max(result["steps"], 1)
        runs[name].append(result)
        measured[name].append({"memory_mib": memory, "step_s": step_s})
        if name == "mapper" and trained_mapper is None:
            trained_mapper = model
        print(
            f"{name} (seed {run_seed}): {result['steps']} steps, {step_s:.2f} s/step, "
            f"{memory['total']:.0f} MiB, val Acc@0.5 {result['metrics'][splits[0]]['acc50']:.1f}"
        )
summary = mapper_study.summaries(runs, splits)

# %% [markdown]
# ## 4 · Figure 1 at this scale
#
# Acc@0.5 (%) on the first evaluation split (mean ± standard deviation over seeds when there are several) against
# the tunable backbone parameters, beside the values of the paper's Figure 1 (RefCOCO val, full-size models, the
# release's schedule). The trivial baselines of notebook 00 give the floor.

# %%
figure1_acc = ablation("mapper", "fig1/petl/acc")
rows = []
for name in mapper_study.FIGURE1:
    setting = mapper_study.VARIANTS[name].figure1
    here = summary[name][first] if name in summary else "not run"
    count = f"{tunable[name]['backbone']:,}" if name in tunable else "–"
    rows.append([setting, count, here, f"{figure1_params.value(setting):g} M", f"{figure1_acc.value(setting):.2f}"])
rows += [[f"baseline: {b}", "0", f"{floors[b][first]:.1f}", "–", "–"] for b in floors]
header = ["method", "tunable backbone params (here)", f"{first} Acc@0.5 (here)"]
print(markdown_table([*header, f"{figure1_acc.source}: tunable", f"{figure1_acc.source}: RefCOCO val"], rows))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name in mapper_study.FIGURE1:
    setting = mapper_study.VARIANTS[name].figure1
    if name in summary:
        s = summary[name][first]
        axes[0].errorbar(tunable[name]["backbone"] / 1e6, s.mean, yerr=s.std, fmt="o", capsize=3, label=setting)
    axes[1].scatter(figure1_params.value(setting), figure1_acc.value(setting), label=setting)
best_floor = max(floors[b][first] for b in floors)
axes[0].axhline(best_floor, color="k", linestyle="--", linewidth=1, label="best trivial baseline")
axes[0].set(xscale="log", xlabel="tunable backbone params (M)", ylabel=f"{first} Acc@0.5 (%)", title="here")
axes[1].set(xscale="log", xlabel="tunable backbone params (M)", ylabel="RefCOCO val Acc@0.5 (%)")
axes[1].set_title(f"reported ({figure1_acc.source})")
for ax in axes:
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5 · Ablations: each module alone, the prior, the release
#
# Acc@0.5 (%) per split. The paper's ablation tables (each module's contribution, with and without the prior) are not
# recorded in `papers/mapper.yaml` (its notes say why: they could not be read), so only our numbers are shown; the
# verdicts in section 8 test the *direction* the paper claims.


# %%
def split_rows(names):
    out_rows = []
    for name in names:
        cells = [str(summary[name][s]) if name in summary else "not run" for s in splits]
        count = f"{tunable[name]['backbone']:,}" if name in tunable else "–"
        out_rows.append([name, mapper_study.VARIANTS[name].label, count, *cells])
    return out_rows


header = ["variant", "what", "tunable backbone params", *splits]
print("Each module alone on the frozen backbones\n")
print(markdown_table(header, split_rows(mapper_study.COMPONENTS)))
print("\nWith and without the prior, paper and release fidelity\n")
print(markdown_table(header, split_rows(("mapper", "no-prior", "release"))))
print("\nTrivial baselines\n")
print(markdown_table(["baseline", *splits], [[b] + [f"{floors[b][s]:.1f}" for s in splits] for b in floors]))

# %% [markdown]
# ## 6 · Training memory and step time
#
# Measured while each variant trained (section 3): MiB of weights, of gradients + AdamW state, and of the tensors
# saved for backward (the largest pass), and seconds per optimiser step. Full fine-tuning pays for the gradients and
# optimiser state of both backbones; every adapter method pays for activations from its first adapted block on
# (autograd keeps what the backward pass through the frozen blocks above it needs).

# %%
# NBVAL_IGNORE_OUTPUT
memory_rows = []
for name in chosen:
    memory = measured[name][0]["memory_mib"]
    steps = [m["step_s"] for m in measured[name]]
    cells = [f"{memory[k]:.0f}" for k in ("weights", "optimiser", "activations", "total")]
    cuda = [f"{memory['cuda_peak']:.0f}"] if "cuda_peak" in memory else []
    memory_rows.append([name, f"{tunable[name]['trainable']:,}", *cells, *cuda, f"{sum(steps) / len(steps):.2f}"])
cuda_header = ["CUDA peak MiB"] if memory_rows and len(memory_rows[0]) == 8 else []
header = ["variant", "trainable params", "weights MiB", "grads + AdamW MiB", "activations MiB", "total MiB"]
print(markdown_table([*header, *cuda_header, "s / step"], memory_rows))

# %%
fig, ax = plt.subplots(figsize=(9, 3.4))
parts = {"weights": "weights", "optimiser": "grads + AdamW", "activations": "saved for backward"}
bottom = [0.0] * len(chosen)
for part, label in parts.items():
    values = [measured[name][0]["memory_mib"][part] for name in chosen]
    ax.bar(chosen, values, bottom=bottom, label=label)
    bottom = [b + v for b, v in zip(bottom, values, strict=True)]
ax.set(ylabel="MiB", title="training memory per variant (measured)")
ax.tick_params(axis="x", rotation=30)
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7 · The trained MaPPER
#
# Its predictions on validation samples (green: ground truth, red: prediction), and DyPA's per-token scales for the
# expressions of section 2 after training.

# %%
if trained_mapper is not None:
    shown = [eval_samples[first][i] for i in range(min(8, len(eval_samples[first])))]
    data = TransformedDataset(shown, GroundingTransform(trained_mapper.transform))
    predicted = predict_boxes(trained_mapper, data, collate_fn=collate, device=params.device)["pred_cxcywh"]
    boxes = [
        input_box_to_image(box, tuple(s.image.shape[1:]), trained_mapper.transform).tolist()
        for box, s in zip(predicted, shown, strict=True)
    ]
    viz.sample_grid(shown, boxes)
    plt.show()
    plot_scales(mapper_study.dypa_token_scales(trained_mapper.cpu(), shown_texts), "DyPA's scales after training")
else:
    print("MaPPER was not among the variants run")

# %% [markdown]
# ## 8 · Verdicts, computed
#
# A claim about accuracy *holds* when the difference is larger than two standard errors of the difference (each
# accuracy's binomial evaluation noise and, with several seeds, the standard error of each mean), is *contradicted*
# when it is that large the other way, and is *within noise* otherwise. Accuracy claims use the first evaluation split.

# %%
# NBVAL_CHECK_OUTPUT
release_count = full_counts["mapper (release accounting)"]["count"]
count_claims = {
    "2,774,043 tunable parameters (release accounting) = 1.41% of 196.06 M": release_count.tunable == 2_774_043
    and f"{100 * release_count.share:.2f}" == f"{reported_share.value:.2f}"
    and f"{release_count.backbone / 1e6:.2f}" == "196.06",
    "MaPPER tunes fewer backbone parameters than every PETL method of Figure 1 (reported)": all(
        figure1_params.value("MaPPER") < figure1_params.value(mapper_study.VARIANTS[n].figure1)
        for n in mapper_study.FIGURE1[:-1]
    ),
    "MaPPER tunes fewer backbone parameters than every PETL baseline built here (sized near its budget)": all(
        release_count.tunable < full_counts[n]["count"].tunable for n in mapper_study.FIGURE1[:-1]
    ),
    "full fine-tuning holds more weights + optimiser state than MaPPER (full size)": (
        full_counts["full"]["bytes"]["optimiser"] > full_counts["mapper"]["bytes"]["optimiser"]
    ),
}
for claim, holds in count_claims.items():
    print(f"{'holds' if holds else 'contradicted':12s}  {claim}")

# %%
floor_summaries = {
    b: {s: mapper_study.seed_summary([floors[b][s]], summary[chosen[0]][s].n) for s in splits} for b in floors
}


def verdict(a, b, split=first):
    if a not in summary or b not in summary:
        return "not run"
    return compare(summary[a][split], summary[b][split])


accuracy_claims = {
    "MaPPER beats full fine-tuning": verdict("mapper", "full"),
    **{
        f"MaPPER beats {mapper_study.VARIANTS[n].figure1}": verdict("mapper", n)
        for n in ("adapter", "lora", "adaptformer")
    },
    **{f"+{m} alone beats the frozen backbones": verdict(m.lower(), "frozen") for m in ("DyPA", "LoCA", "PGT")},
    "the prior helps (MaPPER beats LoCA + DyPA without the prior)": verdict("mapper", "no-prior"),
    "MaPPER at the paper's fidelity beats the release's": verdict("mapper", "release"),
}
if "mapper" in summary:
    beats = [compare(summary["mapper"][s], floor_summaries[b][s]) for s in splits for b in floors]
    accuracy_claims["MaPPER beats every trivial baseline on every split"] = (
        "holds" if all(v == "holds" for v in beats) else "contradicted" if "contradicted" in beats else "within noise"
    )
if "full" in measured and "mapper" in measured:
    lighter = measured["mapper"][0]["memory_mib"]["total"] < measured["full"][0]["memory_mib"]["total"]
    accuracy_claims["MaPPER trains in less memory than full fine-tuning (measured)"] = (
        "holds" if lighter else "contradicted"
    )
for name, pointing in prior_pointing.items():
    accuracy_claims[f"the {name}'s prior points at the referred object above chance"] = mapper_study.compare_to_level(
        mapper_study.seed_summary([pointing["accuracy"]], len(items)), pointing["chance"]
    )
for claim, outcome in accuracy_claims.items():
    print(f"{outcome:12s}  {claim}")

written = (out / "results.json").write_text(
    json.dumps(
        {
            "params": vgstudy.config.as_dict(params),
            "runs": {name: [{**r, **m} for r, m in zip(runs[name], measured[name], strict=True)] for name in runs},
            "summary": {name: {s: vars(v) for s, v in per.items()} for name, per in summary.items()},
            "baselines": floors,
            "full_size_counts": {
                name: {"tunable": c["count"].tunable, "trainable": c["trainable"], **c["bytes"]}
                for name, c in full_counts.items()
            },
            "prior_pointing": prior_pointing,
            "verdicts": {**{k: "holds" if v else "contradicted" for k, v in count_claims.items()}, **accuracy_claims},
        },
        indent=2,
        default=str,
    )
)

# %% [markdown]
# ## What this shows
#
# The parameter claims are checked exactly: the per-module counts above reproduce the paper's 1.41% from the
# release's modules and show what that number contains. The accuracy verdicts are the measured outcome at this
# profile's budget, and need reading with it: in the `tiny` profile each variant trains for a few optimiser steps on
# small frozen backbones, far fewer than the shared grounding head needs to leave the mean-box plateau (notebook 01
# and `benchmarks/grounding_diagnosis.py` measure how many). The `study` profile
# (`notebooks/params/03-study.yaml`) runs every variant longer, on more data, with three seeds; the `paper` profile
# (`notebooks/params/03-paper-<dataset>.yaml`) runs the release's recipe on the real backbones.
