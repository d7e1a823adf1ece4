"""Held-out evaluation of the organism: accuracy, confidence and attention on the objects."""
from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_PATH, EVAL_SEED

__all__ = ["evaluate_organism", "density_ratio", "training_style"]


def _box_mask(boxes, grid: int, size: tuple[int, int]) -> "np.ndarray":
    """Grid cells whose centre lies inside any of ``boxes`` (pixel xyxy), ``[grid, grid]``."""
    import numpy as np

    w, h = size
    cx = (np.arange(grid) + 0.5) * w / grid
    cy = (np.arange(grid) + 0.5) * h / grid
    m = np.zeros((grid, grid), dtype=bool)
    for b in boxes:
        x0, y0, x1, y1 = b.xyxy
        m |= ((cy[:, None] >= y0) & (cy[:, None] < y1)) & ((cx[None, :] >= x0) & (cx[None, :] < x1))
    return m


def evaluate_organism(path: str | Path = DEFAULT_PATH, *, n_groups: int = 100,
                      seed: int = EVAL_SEED, batch_size: int = 50, adapter=None,
                      style: str | None = None):
    """Held-out accuracy and confidence per relation of a trained organism.

    Scenes are fresh balanced groups (:func:`vislens.synth.generate_groups`, ``n_groups``
    per subset, a seed not used for training) in ``style`` (``--style`` syntax; default:
    the training scenes' style from ``path/training.json``, else plain). An answer is
    correct when the first word of the greedy generation matches (:func:`vislens.evaluate.match_first_word`). Columns:
    ``subset, relation, n, accuracy, confidence`` (mean top-1 probability of the first
    answer token), ``p_correct`` (mean probability of the right option), and the
    answer position's attention on the objects, averaged over layers and heads:
    ``box_attention`` (share of its image attention inside the union of the two object
    boxes), ``box_area`` (share of the patch grid they cover), ``box_ratio`` (attention
    per cell inside the boxes over attention per cell outside; 1 means no preference) and
    ``lookalike_attention`` (share inside the look-alike's box, over the scenes that hold
    one; NaN when none do). Rows
    ``"all"`` summarise each subset. ``table.attrs["box_attention_by_layer"]`` holds the
    share per layer (mean over heads and all scenes) and ``"box_ratio_by_layer"`` the ratio.
    """
    import numpy as np
    import pandas as pd

    from ..data.base import Box
    from ..decoding import run_conditions
    from ..evaluate import match_first_word
    from ..models import load_model
    from ..synth import OPTIONS, SceneStyle, generate_groups

    scene_style = SceneStyle.parse(training_style(path) if style is None else style)
    if adapter is None:
        adapter = load_model(path, dtype="float32", device="cpu")
    rows = []
    for subset in ("a", "b"):
        scenes = generate_groups(n_groups, subset, seed, style=scene_style)
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start:start + batch_size]
            res = run_conditions(adapter, [s.image for s in chunk],
                                 [s.sample.question for s in chunk],
                                 [OPTIONS[subset]] * len(chunk), ["baseline"], max_new_tokens=3)
            for s, r in zip(chunk, res):
                b = r["baseline"]
                per_layer = b.image_attention.mean(axis=1)  # [L, G, G]
                inside = _box_mask(s.sample.boxes, per_layer.shape[-1], s.image.size)
                layer_share = per_layer[:, inside].sum(-1) / np.maximum(
                    per_layer.sum(axis=(1, 2)), 1e-12)
                att = per_layer.mean(0)
                share = float(att[inside].sum() / max(att.sum(), 1e-12))
                looks = [Box(d["label"], tuple(float(v) for v in d["xyxy"]))
                         for d in s.sample.meta.get("distractors", [])
                         if d["label"].startswith("lookalike:")]
                look = (float(att[_box_mask(looks, att.shape[-1], s.image.size)].sum()
                              / max(att.sum(), 1e-12)) if looks else float("nan"))
                gold = s.sample.answer
                rows.append({
                    "subset": subset, "relation": s.sample.relation,
                    "correct": match_first_word(b.text, gold), "confidence": b.confidence,
                    "p_correct": float(b.option_probs[OPTIONS[subset].index(gold)]),
                    "box_attention": share, "box_area": float(inside.mean()),
                    "lookalike_attention": look, "layer_share": layer_share,
                })
    df = pd.DataFrame(rows)
    out = []
    for subset, sub in df.groupby("subset", sort=False):
        for rel, g in list(sub.groupby("relation", sort=False)) + [("all", sub)]:
            out.append({"subset": subset, "relation": rel, "n": len(g),
                        "accuracy": g["correct"].mean(), "confidence": g["confidence"].mean(),
                        "p_correct": g["p_correct"].mean(),
                        "box_attention": g["box_attention"].mean(),
                        "box_area": g["box_area"].mean(),
                        "lookalike_attention": g["lookalike_attention"].mean()})
    table = pd.DataFrame(out)
    table["box_ratio"] = density_ratio(table["box_attention"], table["box_area"])
    by_layer = np.stack(df["layer_share"].to_list()).mean(0)
    area = float(df["box_area"].mean())
    table.attrs["box_attention_by_layer"] = [round(float(x), 4) for x in by_layer]
    table.attrs["box_ratio_by_layer"] = [round(float(density_ratio(x, area)), 3) for x in by_layer]
    return table


def training_style(path: str | Path) -> str:
    """The scene style an organism was trained on (``training.json``), ``"plain"`` if unknown."""
    import json

    from .config import TRAIN_FILE

    f = Path(path, TRAIN_FILE)
    if not f.exists():
        return "plain"
    return str(json.loads(f.read_text(encoding="utf-8")).get("style", "plain"))


def density_ratio(share, area):
    """Attention per cell inside the boxes over attention per cell outside them."""
    return (share / area) / ((1 - share) / (1 - area))
