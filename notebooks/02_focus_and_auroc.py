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
# # Where does the answer look, and does it predict a correct answer? (Figures 5, 6, 7, 14)
#
# The capture stores, per layer and head, the answer position's attention over a G x G grid
# laid over the whole image, and (for datasets with boxes) the fraction of each cell covered
# by the question's objects. The overlap (cosine) between the head-mean attention map and
# that mask, per layer, is scored as a predictor of a correct answer (AUROC).

# %% tags=["parameters"]
# Parameters. CAPTURE: a capture file; None -> $VISLENS_CAPTURE, else the demo capture
# vislens-demo/capture_a.h5 at the repository root (created with the demo if missing).
# FIGURES_DIR: None -> $VISLENS_FIGURES_DIR, else figures/ at the repository root.
CAPTURE = None
FIGURES_DIR = None
FORMAT = "png"
LAYER = None  # None: the best-AUROC layer if the capture has a box mask, else the middle layer

# %%
# %matplotlib inline
from vislens import analysis, notebook, plots

capture, out_dir, cap = notebook.notebook_session(CAPTURE, FIGURES_DIR)

# %% [markdown]
# Per-sample, per-layer statistics of every condition, streamed once:

# %%
stats = analysis.all_stats(capture)
base = plots.baseline_condition(cap)
layer = LAYER if LAYER is not None else plots.default_layer(stats, base)
auroc = analysis.per_layer_auroc_table(stats)
print("layer used for the per-layer figures:", layer)
auroc[auroc["condition"] == base]

# %% [markdown]
# ## Figure 5: attention heatmaps, correct vs incorrect answers

# %%
fig5 = notebook.attempt(lambda: plots.attention_heatmaps(cap, layer), out_dir,
                       f"fig05_heatmaps_layer{layer}", FORMAT)
fig5

# %% [markdown]
# ## Figure 6: ROC of the overlap at the two best layers
#
# Undefined (and skipped) without a box mask or when every answer is correct (or every one
# wrong).

# %%
fig6 = notebook.attempt(lambda: plots.overlap_roc(stats, condition=base), out_dir, "fig06_overlap_roc", FORMAT)
fig6

# %% [markdown]
# ## Figure 7: concentration of the image attention and overlap AUROC across layers

# %%
fig7 = notebook.attempt(lambda: plots.variance_and_auroc(cap, stats=stats), out_dir,
                       "fig07_variance_and_auroc", FORMAT)
fig7

# %% [markdown]
# ## Figure 14: entropy and skewness of the image attention, per condition

# %%
fig14 = notebook.attempt(lambda: plots.entropy_skewness(stats, layer), out_dir,
                        f"fig14_entropy_skewness_layer{layer}", FORMAT)
fig14

# %% [markdown]
# Confidence and attention as correctness signals at that layer (AUROC per condition):

# %%
analysis.calibration_table(stats, layer)
