# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Efficient paired attention, step by step, on a real CT
#
# **What you will learn.** How a CT window travels through UNETR++ stage by stage; what the two
# branches of efficient paired attention (EPA, paper Sec. 3.2 and Fig. 2) compute, by re-doing them
# by hand next to the module; what the channel-attention matrices and the spatial attention of a
# voxel look like on a real scan; what the learned projection E does to the token grid; and why EPA's
# cost grows linearly with the number of tokens while standard self-attention grows quadratically.
#
# **How long.** Measured on 2 CPU cores with nothing else running: about 10 s in fast mode
# (`UNETRPP_FAST=1`), 46 s in full mode, with the bundled teaching weights. Converted synapse weights
# work on a 64×128×128 window: sections 2–5 then took about a minute longer (on a busy machine).
#
# The scan is a real abdominal CT from the TotalSegmentator test files (Apache-2.0). The weights are
# the best this repository holds: converted released UNETR++ synapse weights if you made them
# (`python -m unetrpp convert ...`), else the bundled **teaching weights, trained on synthetic
# phantoms** (their attention is less meaningful on a real scan than the released weights').
#
# **Not a medical device.** For research and teaching only; nothing here is meant for diagnosis or treatment.

# %% tags=["parameters"]
import os

FAST = os.environ.get("UNETRPP_FAST", "0") == "1"
SCAN = "../examples/example_ct_sm.nii.gz"  # any CT NIfTI
TOKENS = [256, 1024, 4096] if FAST else [512, 2048, 8192, 32768]  # for the cost comparison
REPEATS = 2 if FAST else 5

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import unetrpp
from unetrpp import io
from unetrpp.attention import EPA, capture_attention
from unetrpp.pretrained import load_pretrained, local_weights
from unetrpp.preprocess import normalize
from unetrpp.visualize import apply_window, slice_2d
from unetrpp.visualize_attention import compute_attention, extract_window, render_attention

torch.manual_seed(0)
available = local_weights()
choice = next((n for n in ("unetrpp_synapse", "unetrpp_tiny_phantom") if n in available), None)
if choice:
    model = load_pretrained(choice)
    print(f"weights: {choice}" + (" (SYNTHETIC teaching weights, trained on phantoms)" if model.config.synthetic else ""))
else:
    model = unetrpp.create_model("unetrpp_tiny").eval()
    print("weights: none found, using a RANDOMLY INITIALISED unetrpp_tiny (the maps will be noise)")
cfg = model.config
print(cfg.name, "| patch", cfg.patch_size, "| spacing", cfg.preprocessing.spacing, "mm")

# %% [markdown]
# ## 1. One window of a real CT
#
# The network sees a fixed window (its patch size) at its training spacing. We take the window around
# the middle of the scan, resampled to the weights' spacing, in HU, then normalised as the weights expect.

# %%
volume = io.load(SCAN, orientation=cfg.preprocessing.orientation)
centre = tuple(s // 2 for s in volume.shape)
window_hu = extract_window(volume.array, volume.spacing, centre, cfg.patch_size, cfg.preprocessing.spacing)
x = torch.from_numpy(normalize(window_hu, cfg.preprocessing).astype(np.float32))[None, None]
print("scan (Z, Y, X):", volume.shape, "spacing", volume.spacing, "mm -> window", tuple(x.shape))

fig, axes = plt.subplots(1, 2, figsize=(9, 4))
orientation = cfg.preprocessing.orientation  # the volume's axis codes: slice_2d turns them to the display's
axes[0].imshow(apply_window(slice_2d(volume.array, "axial", centre[0], orientation), 400, 40), cmap="gray")
axes[0].set_title(f"axial slice {centre[0]} of the scan ({volume.spacing[1]:.1f} mm pixels)\nCT window W 400 / L 40 HU")
axes[1].imshow(apply_window(slice_2d(window_hu, "axial", cfg.patch_size[0] // 2, orientation), 400, 40), cmap="gray")
axes[1].set_title(f"the network's window, {cfg.preprocessing.spacing[1]} mm pixels\nCT window W 400 / L 40 HU")
for ax in axes:
    ax.set_xlabel("patient's right ← → left (radiological), pixels")
    ax.set_ylabel("anterior ↑ posterior ↓, pixels")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Stage by stage
#
# The encoder patchifies with a strided convolution (the stem), then each stage halves the grid and
# widens the channels; TransformerBlocks (EPA + a conv ResBlock) work at each scale. The decoder adds
# the encoder's skips back and refines with more TransformerBlocks.

# %%
enc = model.unetr_pp_encoder
with torch.no_grad():
    h = x
    hidden = []
    for i, (down, stage) in enumerate(zip(enc.downsample_layers, enc.stages)):
        h = down(h)
        print(f"encoder stage {i}: downsample -> {tuple(h.shape)}  ({h.shape[2] * h.shape[3] * h.shape[4]} tokens)")
        h = stage(h)
        hidden.append(h)
    d = model.decoder5(hidden[3], hidden[2]); print("decoder5 ->", tuple(d.shape))
    d = model.decoder4(d, hidden[1]); print("decoder4 ->", tuple(d.shape))
    d = model.decoder3(d, hidden[0]); print("decoder3 ->", tuple(d.shape))
    d = model.decoder2(d, model.encoder1(x)); print("decoder2 ->", tuple(d.shape))
    logits = model.out1(d); print("logits  ->", tuple(logits.shape), "=", len(cfg.class_names), "classes")
    assert torch.allclose(logits, model(x), atol=1e-5)

# %% [markdown]
# EPA's projection E takes the N tokens of a stage down to P. In the released networks P is always at
# most N (synapse: P = 64, 64, 64, 32 for N = 32768, 4096, 512, 64). The small teaching preset
# `unetrpp_tiny` keeps P = 16 at its last stage, which has only 8 tokens: there E maps 8 tokens *up*
# to 16, which still runs but no longer compresses anything.

# %% [markdown]
# ## 3. Open one EPA block and compute it by hand
#
# Take the first block of encoder stage 0. Its EPA receives layer-normed tokens t of shape (B, N, C).
# One linear layer gives the shared queries and keys and two sets of values; then
# - **channel attention** A_CA = softmax(q̂ k̂ᵀ · τ₁), a d×d map per head (q̂, k̂ L2-normalised over tokens);
# - **spatial attention** A_SA = softmax(q̂ᵀ (E k) · τ₂), an N×P map per head, where E projects the N
#   tokens of the keys down to P (and F does the same for the values).
#
# Two details the paper's equations leave out, both as in the original code. E and F may be one layer:
# the released synapse network shares them (`kv_projection="shared"`, E is F), while the teaching
# preset `unetrpp_tiny` has two (`"separate"`; notebook 02, exercise 2, counts what sharing saves).
# And where the paper scales the products by 1/√d, the code L2-normalises q and k and multiplies by
# learned temperatures τ₁ and τ₂ (one per head), as XCiT does.
#
# Below, every step is written out with plain tensor operations and compared with the module.

# %%
block = enc.stages[0][0]
epa: EPA = block.epa_block
with torch.no_grad():
    tokens = rearrange(enc.downsample_layers[0](x), "b c z y x -> b (z y x) c") + block.pos_embed
    t = block.norm(tokens)  # (B, N, C)
    B, N, C = t.shape
    heads = epa.heads
    q, k, v_ca, v_sa = rearrange(epa.qkvv(t), "b n (four h d) -> four b h d n", four=4, h=heads)  # (B, h, d, N)
    k_proj = k @ epa.E.weight.T + epa.E.bias if hasattr(epa, "E") else k @ epa.EF  # (B, h, d, P)
    v_proj = v_sa @ epa.F.weight.T + epa.F.bias if hasattr(epa, "F") else v_sa @ epa.EF
    q_hat = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k_hat = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    A_ca = torch.softmax(q_hat @ k_hat.transpose(-2, -1) * epa.temperature, dim=-1)  # (B, h, d, d)
    x_ca = rearrange(A_ca @ v_ca, "b h d n -> b n (h d)")
    A_sa = torch.softmax(q_hat.transpose(-2, -1) @ k_proj * epa.temperature2, dim=-1)  # (B, h, N, P)
    x_sa = (A_sa @ v_proj.transpose(-2, -1)).permute(0, 3, 1, 2).reshape(B, N, C)  # the original's reshape
    by_hand = (x_ca + x_sa if epa.branch_fusion == "sum"
               else torch.cat([epa.out_proj(x_sa), epa.out_proj2(x_ca)], dim=-1))
    module_out = epa(t)
print("tokens", tuple(t.shape), "| A_CA", tuple(A_ca.shape), "| A_SA", tuple(A_sa.shape))
difference = (by_hand - module_out).abs().max().item()
largest = module_out.abs().max().item()
# the module runs these same steps (attention.py): 0, or float32 rounding of about 1e-7 of the values' size
print(f"max |by hand - module| = {difference:.2g}, {difference / largest:.1g} of the largest output ({largest:.3g})")
assert difference <= 1e-5 * largest

# %% [markdown]
# ## 4. Channel attention: which feature channels go together
#
# One d×d matrix per head; row i says how much channel i of the output draws on each channel of the
# values, summed over the whole window. Rows sum to one.

# %%
with torch.no_grad(), capture_attention(model) as maps:
    model(x)
names = list(maps)
first = maps[names[0]]
# what the figures below show comes from these weights: say so on every one
WEIGHTS_NOTE = "SYNTHETIC teaching weights" if cfg.synthetic else f"weights {choice or 'RANDOM (untrained)'}"
fig, axes = plt.subplots(1, heads, figsize=(3.2 * heads, 3.4), layout="constrained")
top = first["channel"][0].max().item()  # one colour scale for all heads, so the one colour bar reads every panel
for i, ax in enumerate(axes):
    im = ax.imshow(first["channel"][0, i].numpy(), cmap="viridis", vmin=0, vmax=top)
    ax.set_title(f"head {i + 1}")  # numbered from 1, as in the viewer
    ax.set_xlabel("value channel")
    ax.set_xticks(range(im.get_array().shape[1]))
    ax.set_yticks(range(im.get_array().shape[0]))
axes[0].set_ylabel("output channel")
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
fig.suptitle(f"Channel attention A_CA, {names[0]} (d = {first['channel'].shape[-1]}; {WEIGHTS_NOTE})")
plt.show()

# %% [markdown]
# ## 5. Spatial attention of chosen voxels, back on the scan
#
# Query token q attends to the P projected tokens with weights A_SA[q]; since each projected token is
# a learned mix of all N tokens (the rows of E), the effective attention of q over the window is
# A_SA[q] · E, a map over all N tokens. We show it as a heat-map for three query voxels (green cross).
#
# **Read it as "where the query of this voxel looks", not "what this voxel's output is made of".** The
# original code reshapes the spatial branch's (B, d, h, N) result straight to (B, N, C) (section 3,
# and exercise 5), so the C numbers query q produces land in the features of other tokens: token n
# receives the results of queries n·C … n·C + C − 1 (mod N). The released weights were trained with
# this mixing, so it is reproduced, not repaired.

# %%
queries = [centre,
           (centre[0], centre[1] + volume.shape[1] // 6, centre[2] - volume.shape[2] // 5),
           (centre[0], centre[1] - volume.shape[1] // 6, centre[2] + volume.shape[2] // 5)]
fig, axes = plt.subplots(1, len(queries), figsize=(4.2 * len(queries), 4.6), layout="constrained")
for ax, query in zip(axes, queries):
    view = compute_attention(model, volume.array, volume.spacing, query, block=names[0],
                             orientation=cfg.preprocessing.orientation)
    ax.imshow(render_attention(view, "axial"))
    ax.set_title(f"query voxel (z, y, x) = {query}")
    ax.axis("off")
# the overlay scales each map from its own minimum to its maximum (vis.heatmap_overlay)
fig.colorbar(plt.cm.ScalarMappable(cmap="inferno"), ax=axes, shrink=0.7,
             label="attention, each map's min (0) to max (1)")
fig.suptitle(f"Effective spatial attention A_SA[q]·E, mean over heads, {names[0]} (window {cfg.patch_size}; "
             f"{WEIGHTS_NOTE})")
plt.show()

# %% [markdown]
# ## 6. What E has learned
#
# Each of the P rows of E is a weighting of the N tokens: a spatial pattern on the token grid. Here are
# a few rows, one axial slice through the middle of the grid (one pixel per token, a block of voxels
# the size of the stem, shown in the same orientation as the CT above).
#
# What to look for: whether a row weighs a compact region, broad areas of one sign, or everything
# alike. Nothing forces a row to be smooth, since E may mix any tokens, and E starts as random noise:
# with the teaching weights, trained briefly on phantoms, some rows weigh a broad region of one sign
# on top of that noise, while others are still mostly noise; a random model's rows are pure noise.
# Compare the rows of a first-stage block with those of a later stage, or of the released weights if
# you have converted them.

# %%
E = first["E"].numpy()  # (P, N)
grid = first["grid"]
rows = [0, 1, 2, 3, E.shape[0] // 2, E.shape[0] - 1]
fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3.2), layout="constrained")
for ax, r in zip(axes, rows):
    pattern = slice_2d(E[r].reshape(grid), "axial", grid[0] // 2, orientation)  # as the CT slices are shown
    lim = np.abs(pattern).max()
    im = ax.imshow(pattern, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(f"row {r} of E")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("right ← → left, tokens")  # as the CT's axes in section 1
    fig.colorbar(im, ax=ax, orientation="horizontal", shrink=0.9, label="weight")
axes[0].set_ylabel("anterior ↑ posterior ↓, tokens")
fig.suptitle(f"Learned token projections E as spatial patterns (grid {grid}, axial middle slice; {WEIGHTS_NOTE})")
plt.show()

# %% [markdown]
# ## 7. The cost: EPA against standard self-attention, measured
#
# We time one EPA module and one standard multi-head self-attention (PyTorch's
# `scaled_dot_product_attention`, same channels and heads) on N tokens of C = 32 channels, on one CPU
# thread: with two, kernels this small spend most of their time waiting for the second thread whenever
# anything else runs (a 0.5 ms block measured 12-35 ms on a busy 2-core machine). Each point is the
# fastest of several runs: other programs only ever add time, so the minimum is the steadiest estimate.
# If the lines still wiggle, close other programs and rerun.

# %%
C_demo, heads_demo, P_demo = 32, 4, 64


def best_ms(fn, repeats=REPEATS):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


epa_ms, sa_ms = [], []
qkv = torch.nn.Linear(C_demo, 3 * C_demo)
threads = torch.get_num_threads()
torch.set_num_threads(1)  # restored below, also when the cell is interrupted
try:
    for n in TOKENS:
        tok = torch.randn(1, n, C_demo)
        epa_demo = EPA(n, C_demo, P_demo, heads_demo).eval()
        with torch.no_grad():
            epa_ms.append(best_ms(lambda: epa_demo(tok)))
            q_, k_, v_ = rearrange(qkv(tok), "b n (three h d) -> three b h n d", three=3, h=heads_demo)
            sa_ms.append(best_ms(lambda: F.scaled_dot_product_attention(q_, k_, v_)))
        # as each size is done: the largest self-attention takes a minute on a busy laptop
        print(f"N = {n:6d}: EPA {epa_ms[-1]:8.2f} ms, self-attention {sa_ms[-1]:8.2f} ms", flush=True)
finally:
    torch.set_num_threads(threads)
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.loglog(TOKENS, sa_ms, "o-", label="self-attention (N×N)")
ax.loglog(TOKENS, epa_ms, "s-", label=f"EPA (N×{P_demo} and d×d)")
ax.set_xticks(TOKENS, [f"{n:,}" for n in TOKENS])  # the measured sizes, without overlapping minor labels
ax.xaxis.set_minor_locator(plt.NullLocator())
ax.set_xlabel("tokens N")
ax.set_ylabel(f"forward time (ms, 1 CPU thread, best of {REPEATS})")
ax.set_title("Measured cost of one attention block")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
# 1. Change the block in section 5 to a decoder block (`names[-1]`). How does the attention of the
#    same voxel change between the first encoder stage and the last decoder stage?
# 2. Double `epa.temperature2` of the first block and recompute section 5. Sharper or smoother? Why?
# 3. In section 3, skip the L2 normalisation of q and k. How far is the result from the module?
# 4. On section 7's log-log plot both curves are close to straight lines: estimate their slopes. What do
#    they say about time? Memory needs care: `scaled_dot_product_attention` is a fused kernel that never
#    holds the N×N map (a process running it at N = 32,768 peaked at 0.24 GB), while the plain
#    `torch.softmax(q_ @ k_.transpose(-2, -1), -1) @ v_` holds h·N² numbers twice (the product and its
#    softmax): 2.3 GB at N = 8,192, 34 GB at N = 32,768. After section 7, q_, k_ and v_ hold its largest
#    N: rebuild them for N ≤ 8,192 before you try it. Which of the two does EPA's memory advantage apply to?
# 5. The original reshapes the spatial branch from (B, d, h, N) straight to (B, N, C). Write the
#    "clean" reshape instead and measure how much the block output changes.
