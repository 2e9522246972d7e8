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
# # 02 · Why UNETR++ is cheap: parameters, MACs, latency and memory, measured here
#
# **What you will learn.** How many parameters and multiply-accumulates (MACs) UNETR++ needs next to
# MONAI's UNETR and Swin-UNETR at the same input; where they sit inside UNETR++; how cost grows with the
# input size (linear for efficient paired attention, quadratic for UNETR's self-attention); and why
# "FLOPs" in papers must be read with care.
#
# **How long.** Measured on 2 CPU cores with nothing else running: under a minute in fast mode
# (`UNETRPP_FAST=1`, small inputs), about a minute in full mode (the paper's 64×128×128 input; 61 s).
# Other programs running at the same time can make it several times longer. Every number below is measured in this run,
# on this machine; the paper's numbers sit beside them for comparison.

# %% tags=["parameters"]
import os

FAST = os.environ.get("UNETRPP_FAST", "0") == "1"  # set UNETRPP_FAST=1 for a quick run
INPUT = (1, 1, 32, 64, 64) if FAST else (1, 1, 64, 128, 128)  # (B, C, Z, Y, X)
REPEATS = 3  # timed forward passes per network (median: one slow pass on a busy machine does not count)
THREADS = 2  # CPU threads for the timings
SIZES = [(16, 32, 32), (32, 64, 64), (32, 96, 96)] if FAST else [(32, 64, 64), (64, 128, 128), (64, 160, 160), (96, 192, 192)]

# %%
import json
import subprocess
import sys

import matplotlib.pyplot as plt
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio

from unetrpp import create_model
from unetrpp.complexity import PAPER_TABLE, count_flops, parameter_breakdown

# Interactive figures in Jupyter; an HTML export (File > Save and Export) draws them too, loading
# plotly.js from its CDN when opened.
pio.renderers.default = "plotly_mimetype+notebook_connected"
print("input", "x".join(map(str, INPUT)), "| fast mode" if FAST else "| full mode")


# %% [markdown]
# ## 1. Three networks, one input
#
# Each network is measured in its own Python process (`python -m unetrpp complexity --json`), so
# that the peak resident memory reported is that network's alone. MACs are counted with
# `torch.utils.flop_counter` on PyTorch's meta device (nothing is computed for the count).

# %%
def measure(network: str) -> dict:
    cmd = [sys.executable, "-m", "unetrpp", "complexity", "--network", network, "--json",
           "--input", *map(str, INPUT), "--time", str(REPEATS), "--threads", str(THREADS)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:  # say why, as the command does in its last line, not only that it failed
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"{network} at input {'x'.join(map(str, INPUT))}: {why}")
    return json.loads(done.stdout)


runs = {}
for name, network in [("UNETR++", "unetrpp"), ("UNETR", "unetr"), ("Swin-UNETR", "swin_unetr")]:
    # each takes from seconds to minutes on a laptop: say which one runs, not only when all are done
    print(f"measuring {name} in its own process ...", flush=True)
    runs[name] = measure(network)
print(f"{'network':12s} {'params (M)':>10s} {'GMACs':>8s} {'forward (s)':>11s} {'peak RSS (MB)':>13s}"
      f" | paper: {'params':>6s} {'GMACs':>7s}")
for name, r in runs.items():
    paper = PAPER_TABLE[name]
    print(f"{name:12s} {r['params'] / 1e6:10.2f} {r['macs'] / 1e9:8.2f} {r['seconds']:11.3f} {r['peak_rss_mb']:13.0f}"
          f" | {paper['params_M']:13.2f} {paper['GMACs']:7.2f}")

# %% [markdown]
# The paper's GFLOPs are for 64×128×128; in fast mode the input is 8× smaller, so MACs are roughly
# 8× smaller too. Parameters barely depend on the input for Swin-UNETR; UNETR's positional embedding
# has one vector per 16³ patch (92.66 M at 32×64×64 against 92.83 M at 64×128×128), and UNETR++'s
# positional embeddings and E/F projections are sized by the number of tokens, so its count changes most.
# At the paper's input, UNETR++ has exactly as many parameters as the released synapse checkpoint
# holds, 42.95 M (the paper's table prints 42.96 M). The peers come from today's MONAI, whose blocks
# differ in small details from the versions the paper measured, so their counts differ from the paper's
# table by up to about 1 % (UNETR 92.83 M against 92.49 M, Swin-UNETR 62.19 M against 62.83 M; the
# details were not traced).
#
# The forward times are medians of a few runs on whatever else this machine is doing: on a shared or
# busy laptop they can vary several-fold between runs, while parameters and MACs never change. If the
# times look odd, close other programs and rerun this section.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
names = list(runs)
colors = ["#d6604d", "#4393c3", "#92c5de"]
for ax, key, scale, label in zip(axes, ["params", "macs", "seconds"], [1e6, 1e9, 1],
                                 ["parameters (millions)", "multiply-accumulates (G MACs)", "forward time (s, CPU)"]):
    ax.bar(names, [runs[n][key] / scale for n in names], color=colors)
    ax.set_ylabel(label)
    ax.set_title(label.split(" (")[0])
fig.suptitle(f"Measured at input {'x'.join(map(str, INPUT[2:]))} voxels, {THREADS} CPU threads")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Where UNETR++ keeps its parameters and spends its MACs
#
# Hover over the bars. The convolutional ResBlocks inside each TransformerBlock hold the most
# parameters; E/F and the positional embeddings come next because they scale with the token count.
# The MACs, on the other hand, are about half at full resolution (`encoder1` and `decoder2`, the
# modules named as in the released checkpoint), where a few 16-channel convolutions touch every voxel,
# while those layers hold under 0.1 % of the parameters.
#
# The network here is built with deep supervision, as it is trained, so that every parameter of the
# released checkpoint is counted: "segmentation heads" includes the two auxiliary heads `out2` and
# `out3`, and their 0.02 G MACs make the total here 47.47 G, against 47.45 G for the inference network
# of section 3, which has the one head `out1`.

# %%
model = create_model("unetrpp_synapse", patch_size=INPUT[2:], deep_supervision=True)
params = parameter_breakdown(model)
flops, per_module = count_flops(model, INPUT)
fig = go.Figure(go.Bar(x=[v / 1e6 for v in params.values()], y=list(params), orientation="h",
                       hovertemplate="%{y}: %{x:.3f} M parameters<extra></extra>"))
fig.update_layout(title="UNETR++ parameters by component", xaxis_title="parameters (millions)",
                  yaxis=dict(autorange="reversed", title="component"), height=420,
                  margin=dict(l=10, r=10, t=40, b=40))
fig.show()
fig = px.bar(x=list(per_module), y=[v / 2e9 for v in per_module.values()],
             labels={"x": "top-level module (attribute of the model)", "y": "G MACs"},
             title="UNETR++ MACs by top-level module")
fig.show()

# %% [markdown]
# ## 3. How cost grows with the input
#
# UNETR turns a 16³-voxel patch into a token and runs full self-attention: its attention cost grows
# with the square of the token count. EPA's channel attention is d×d and its spatial attention N×P
# with a fixed P, so UNETR++ grows linearly. Here are the counted MACs of the whole networks. Both
# curves look straight: at these sizes UNETR has few tokens (256 at 64×128×128), so its attention is a
# small share next to its convolutional decoder, which grows linearly; its MACs per voxel creep up
# only slightly (about 82 k at 32×64×64, 86 k at 96×192×192). The quadratic term shows in the next
# cell, one attention block at a time, and takes over at much larger inputs (exercise 3).

# %%
from unetrpp.complexity import build_network

rows = []
for size in SIZES:
    shape = (1, 1, *size)
    voxels = size[0] * size[1] * size[2]
    for kind, label in [("unetrpp", "UNETR++"), ("unetr", "UNETR")]:
        net = build_network(kind, shape)
        total, _ = count_flops(net, shape)
        rows.append({"network": label, "voxels": voxels, "G MACs": total / 2e9, "size": "x".join(map(str, size))})
        del net
fig = px.line(rows, x="voxels", y="G MACs", color="network", markers=True, hover_data=["size"],
              title="Total MACs against the number of input voxels")
fig.update_xaxes(title="input voxels")
fig.show()

# %% [markdown]
# The same comparison inside one EPA block against standard self-attention, counted from formulas
# (nothing is run): for N tokens of C channels in h heads, self-attention needs about 2·N²·C MACs for
# QKᵀ and AV. EPA needs about 2·N·C·(C/h) for the channel branch (h maps of (C/h)×(C/h)), 2·N·P·C for
# the spatial branch (h maps of N×P, each over C/h channels) and 2·N·P·C for projecting keys and values
# to P tokens with E and F. Here C = 32, h = 4 and P = 64, as in the first encoder stage.

# %%
import numpy as np

C, h, P = 32, 4, 64
N = np.array([512, 4096, 32768, 262144])
self_attention = 2 * N**2 * C
epa = 2 * N * C * (C // h) + 2 * N * P * C + 2 * N * P * C
fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.loglog(N, self_attention / 1e9, "o-", label="self-attention (quadratic)")
ax.loglog(N, epa / 1e9, "s-", label="EPA (linear)")
ax.set_xlabel("tokens N")
ax.set_ylabel("G MACs per block (C = 32)")
ax.set_title(f"Attention cost against the token count\n(from the formulas; C = {C}, h = {h}, P = {P})")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. An honest note on counting FLOPs
#
# - The UNETR++ paper reports "FLOPs" counted by fvcore, which counts one per **multiply-accumulate**.
#   `torch.utils.flop_counter` counts **two** per multiply-add, so its "FLOPs" are twice the paper's;
#   this notebook reports MACs = counted FLOPs / 2.
# - Neither counts everything: flop_counter ignores norms, softmax, activations and additions; fvcore
#   counts some element-wise ops, so it reports 47.89 G for UNETR++ where flop_counter gives 47.47 G MACs,
#   and the paper's table says 47.98 G. UNETR comes out at 86.97 G MACs here against the paper's 75.76 G:
#   different counters disagree on attention and transposed convolutions.
# - MACs are not seconds. Memory traffic, layouts and the kernels a library picks decide the wall
#   time, so the ratio of the forward times in section 1 is not the ratio of the MACs. Section 1
#   times the plain network; in `benchmarks/README.md` (2 CPU cores, machine otherwise idle) plain
#   UNETR++ took about 0.77–0.80× of UNETR's time for 0.55× of its MACs, and the rewrites
#   `unetrpp.segment()` runs (`unetrpp.fast`) bring it to about 0.45×. Your ratio above may differ:
#   it depends on the CPU, and on anything else running while it was measured.
#
# ## Exercises
# 1. Change `INPUT` to a patch whose depth is not a multiple of 16 (for UNETR++: of the stem × 8).
#    Which network refuses it, and what does the error say?
# 2. Build `create_model("unetrpp_synapse", kv_projection="separate")`. How many parameters do the
#    separate E and F add, and do the MACs change? Why?
# 3. Using section 3, find the input size at which UNETR's self-attention costs more MACs than all of
#    UNETR++.
# 4. Time the forward pass with 1, 2 and 4 threads (`--threads`). How well does each network scale?
