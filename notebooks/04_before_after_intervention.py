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
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Attention before and after the intervention (Figures 9, 10 and 26)
#
# The same examples under the baseline and under ScalingVis: smoothing (α < 1, Figure 9)
# and sharpening (α > 1, Figure 10), at one layer. Examples whose answer the intervention
# fixes come first. Figure 26 shows the distribution of the image attention logits before
# and after scaling: the capture stores softmax weights, whose logs equal the logits up to
# a per-map constant, so it plots centred log weights (log w - mean log w).

# %% tags=["parameters"]
# Parameters. CAPTURE: a capture file; None -> $VISLENS_CAPTURE, else the demo capture
# vislens-demo/capture_a.h5 at the repository root (created with the demo if missing).
# FIGURES_DIR: None -> $VISLENS_FIGURES_DIR, else figures/ at the repository root.
CAPTURE = None
FIGURES_DIR = None
FORMAT = "png"
LAYER = None  # None: the paper's layers at this model's depth (17 of 32; 14 for Fig. 26), not the
#               best layer on the same data (that would flatter the AUROCs); N: layer N for all

# %%
# %matplotlib inline
from vislens import analysis, notebook, plots

capture, out_dir, cap = notebook.notebook_session(CAPTURE, FIGURES_DIR)

# %%
base = plots.baseline_condition(cap)
layers = notebook.figure_layers(cap, LAYER)  # prints which layers are used
layer, layer26 = layers[9][0], layers[26][0]

# %% [markdown]
# ## Figure 9: smoothing (α < 1)

# %%
fig9 = notebook.attempt(lambda: plots.before_after(cap, layer, kind="smooth"), out_dir,
                       f"fig09_smoothing_layer{layer}", FORMAT)
fig9

# %% [markdown]
# ## Figure 10: sharpening (α > 1)

# %%
fig10 = notebook.attempt(lambda: plots.before_after(cap, layer, kind="sharpen"), out_dir,
                        f"fig10_sharpening_layer{layer}", FORMAT)
fig10

# %% [markdown]
# ## Figure 26: image attention logits before and after scaling
#
# ScalingVis multiplies the image logits by α, so the spread of the centred log weights
# should scale by α (compare the standard deviations in the legend; float16 storage drops
# the smallest weights, which narrows the lower tail of sharpened maps).

# %%
fig26 = notebook.attempt(lambda: plots.log_attention_distribution(cap, layer26), out_dir,
                        f"fig26_log_attention_layer{layer26}", FORMAT)
fig26
