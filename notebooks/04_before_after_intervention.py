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
# fixes come first. Figure 26 shows the distribution of the answer row's image attention
# logits (mean and max over the image keys, stored by the capture) before and after scaling.

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
# The capture stores the answer row's image-key logits (q·k/√d after the intervention,
# before the softmax): their mean and max per head. ScalingVis multiplies them by α, so
# α < 1 pulls the lines towards 0 and α > 1 pushes them away; ticks at the foot of each panel mark
# the samples the intervention corrected. Captures made before vislens 0.2 have no logits
# (the cell then says so).

# %%
fig26 = notebook.attempt(lambda: plots.attention_logit_distribution(cap, layer26), out_dir,
                        f"fig26_attention_logits_layer{layer26}", FORMAT)
fig26
