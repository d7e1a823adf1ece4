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
# # Scaling the image attention: accuracy and confidence (Figures 8 and 15)
#
# ScalingVis multiplies the answer position's image attention logits by α (α < 1 smooths
# the attention over the image, α > 1 sharpens it). Figure 8 sweeps α over the capture's
# `scaling` conditions (the baseline is α = 1), per gold relation; Figure 15 compares the
# gold relations per subset, how often LLaVA's training conversations use each relation
# phrase (`PHRASE_STATS`) and the model's confidence per relation and subset: confidence is
# the signal AdaptVis uses to choose between smoothing and sharpening.

# %% tags=["parameters"]
# Parameters. CAPTURE: a capture file; None -> $VISLENS_CAPTURE, else the demo capture
# vislens-demo/capture_a.h5 at the repository root (created with the demo if missing).
# FIGURES_DIR: None -> $VISLENS_FIGURES_DIR, else figures/ at the repository root.
CAPTURE = None
FIGURES_DIR = None
FORMAT = "png"
SUBSETS = []  # more capture files (other subsets) to compare with this one in Figure 15
PHRASE_STATS = None  # `vislens phrase-stats CONVERSATIONS.json --out FILE.csv` output, for Fig. 15

# %%
# %matplotlib inline
from vislens import analysis, notebook, plots

capture, out_dir, cap = notebook.notebook_session(CAPTURE, FIGURES_DIR)

# %% [markdown]
# Accuracy and mean confidence per condition and gold relation:

# %%
table = cap.table()
table.pivot_table(index="relation", columns="condition", values="correct", aggfunc="mean").round(3)

# %% [markdown]
# ## Figure 8: accuracy and confidence vs α, per gold relation

# %%
fig8 = notebook.attempt(lambda: plots.scaling_sweep(cap), out_dir, "fig08_scaling_sweep", FORMAT)
fig8

# %% [markdown]
# ## Figure 15: gold relations, training phrases and confidence per subset (baseline)

# %%
fig15 = notebook.attempt(lambda: plots.relation_familiarity([cap, *SUBSETS], PHRASE_STATS), out_dir,
                        "fig15_confidence_by_relation", FORMAT)
fig15

# %% [markdown]
# Confidence by gold relation in this capture, correct vs incorrect answers:

# %%
notebook.attempt(lambda: plots.confidence_by_relation(table))
