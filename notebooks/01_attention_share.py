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
# # How much does the answer look at the image? (paper Figures 3 and 4)
#
# The answer position (the last prompt token) attends to image and text tokens. Figure 3
# compares the image tokens' share of the prompt with their share of that token's
# attention, per layer. Figure 4 adds a constant δ to every image attention logit
# (conditions `add:delta=D`), which multiplies the image weights by e^δ, and asks whether
# more attention on the image by itself helps.

# %% tags=["parameters"]
# Parameters. CAPTURE: a capture file; None -> $VISLENS_CAPTURE, else the demo capture
# vislens-demo/capture_a.h5 at the repository root (created with the demo if missing).
# FIGURES_DIR: None -> $VISLENS_FIGURES_DIR, else figures/ at the repository root.
CAPTURE = None
FIGURES_DIR = None
FORMAT = "png"
LAYER = None  # unused here: Figures 3 and 4 cover all layers

# %%
# %matplotlib inline
from vislens import analysis, notebook, plots

capture, out_dir, cap = notebook.notebook_session(CAPTURE, FIGURES_DIR)

# %% [markdown]
# ## Figure 3: image tokens' share of the prompt vs of the attention
#
# Token counts come from the capture (`/samples/n_image_tokens`, `n_text_tokens`) when it
# stores them; pass `n_image_tokens=` / `n_text_tokens=` to override. Without text token
# counts only the attention share is drawn.

# %%
fig3 = notebook.attempt(lambda: plots.attention_share(cap), out_dir, "fig03_attention_share", FORMAT)
fig3

# %% [markdown]
# The numbers behind the figure, per condition (all layers):

# %%
stats = analysis.all_stats(capture)
analysis.summary_table(stats)[["condition", "n", "accuracy", "confidence", "image_attention_share"]]

# %% [markdown]
# ## Figure 4: accuracy vs a constant added to the image attention logits
#
# Needs conditions with method `add` (e.g. `--condition add:delta=-1 --condition add:delta=1`);
# the demo capture has none, so the figure is skipped there with a note.

# %%
fig4 = notebook.attempt(lambda: plots.add_constant_accuracy(cap), out_dir,
                       "fig04_add_constant_accuracy", FORMAT)
fig4
