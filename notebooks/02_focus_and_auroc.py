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
LAYER = None  # None: the paper's layers at this model's depth (17 of 32; 14 for Fig. 26), not the
#               best layer on the same data (that would flatter the AUROCs); N: layer N for all
SUBSETS = []  # more capture files (other subsets) to compare with this one in Figure 14

# %%
# %matplotlib inline
from vislens import analysis, notebook, plots

capture, out_dir, cap = notebook.notebook_session(CAPTURE, FIGURES_DIR)

# %% [markdown]
# Per-sample, per-layer statistics of every condition, streamed once:

# %%
stats = analysis.all_stats(capture)
base = plots.baseline_condition(cap)
layers = notebook.figure_layers(cap, LAYER)  # prints which layers are used
layer = layers[5][0]
auroc = analysis.per_layer_auroc_table(stats)
auroc[auroc["condition"] == base]

# %% [markdown]
# ## Figure 5: attention heatmaps, correct vs incorrect answers

# %%
fig5 = notebook.attempt(lambda: plots.attention_heatmaps(cap, layer), out_dir,
                       f"fig05_heatmaps_layer{layer}", FORMAT)
fig5

# %% [markdown]
# ## Figure 6: ROC of the overlap at the paper's layers (17 and 18 of 32)
#
# Undefined (and skipped) without a box mask or when every answer is correct (or every one
# wrong).

# %%
fig6 = notebook.attempt(lambda: plots.overlap_roc(stats, layers[6], condition=base), out_dir, "fig06_overlap_roc", FORMAT)
fig6

# %% [markdown]
# ## Figure 7: concentration of the image attention and overlap AUROC across layers

# %%
fig7 = notebook.attempt(lambda: plots.variance_and_auroc(cap, stats=stats), out_dir,
                       "fig07_variance_and_auroc", FORMAT)
fig7

# %% [markdown]
# ## Figure 14: entropy (Eq. 4) and positional skewness (Eq. 5) of the image attention
#
# The paper compares subsets (Controlled_A/B vs COCO): list more capture files in `SUBSETS`.
# Below it, the same per condition of this capture.

# %%
fig14 = notebook.attempt(lambda: plots.subset_entropy_skewness([cap, *SUBSETS], layers[14][0]),
                        out_dir, f"fig14_entropy_skewness_layer{layers[14][0]}", FORMAT)
fig14

# %%
notebook.attempt(lambda: plots.entropy_skewness(stats, layers[14][0]))

# %% [markdown]
# Confidence and attention as correctness signals at that layer (AUROC per condition):

# %%
analysis.calibration_table(stats, layer)
