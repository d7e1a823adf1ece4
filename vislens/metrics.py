"""Pure array metrics over captured answer-position attention.

A capture holds, per sample ``n``, layer ``l`` and head ``h``, the softmax attention of
the answer position (last prompt token) over a ``G x G`` analysis grid of image cells,
``attn[N, L, H, G, G]``; the cells sum to the image attention mass (< 1). ``mask[N, G, G]``
is the fraction of each cell covered by the question's objects.

Every function here takes plain numpy arrays, returns numpy arrays (or a small
DataFrame for AUROC tables), and treats samples independently, so a streaming reader can
call the per-sample functions chunk by chunk and concatenate. Nothing here knows about
conditions: compute each condition (baseline, ScalingVis, AdaptVis, ...) separately and
compare, e.g. ``per_layer_auroc(...).assign(condition="scalingvis_0.8")``.

Attention maps given as float32 (what :meth:`vislens.store.Capture.attention` returns) are
reduced in float32: the relative error of a 576-cell reduction is ~1e-6, far below the
~1e-3 rounding of the float16 the capture stores, and it halves the memory traffic of a
streaming pass. Every other input (float16, integers, scores) is promoted to float64, and
results are float64. An undefined value (an all-zero attention map, an AUROC with one
class) is NaN, never a made-up default.
"""
from __future__ import annotations

import warnings
from typing import Literal, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy.stats import entropy as _scipy_entropy
from scipy.stats import skew as _scipy_skew
from sklearn.metrics import roc_auc_score, roc_curve

from .errors import VislensError

__all__ = [
    "AttentionShare",
    "AurocResult",
    "attention_entropy",
    "attention_share",
    "attention_skewness",
    "auroc",
    "calibration_aurocs",
    "layer_variance",
    "normalize_maps",
    "overlap",
    "per_layer_auroc",
    "roc",
]


# --------------------------------------------------------------------------- helpers


def _as_float(a: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == bool
    ):
        raise VislensError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_maps(attn: np.ndarray, name: str = "attn", min_ndim: int = 2) -> np.ndarray:
    """A numeric map array: float32 stays float32 (see module notes), the rest float64."""
    arr = attn if isinstance(attn, np.ndarray) and attn.dtype == np.float32 else _as_float(attn, name)
    if arr.ndim < min_ndim:
        raise VislensError(
            f"{name}: expected at least {min_ndim} dims ending in the G x G grid, got shape {arr.shape}"
        )
    return arr


def _align_leading(arr: np.ndarray, ndim: int, trailing: int, name: str) -> np.ndarray:
    """Insert singleton axes after ``arr``'s sample axes so it broadcasts to ``ndim`` dims.

    ``trailing`` is the number of axes that must line up from the right (2 for a G x G
    grid, 0 for a per-sample value). Leading (sample) axes line up from the left, so a
    ``[N, G, G]`` mask broadcasts against ``[N, L, H, G, G]`` attention.
    """
    if arr.ndim > ndim:
        raise VislensError(f"{name}: has {arr.ndim} dims, more than the {ndim} it must match")
    lead = arr.ndim - trailing
    if lead <= 0 or arr.ndim == ndim:
        return arr
    shape = arr.shape[:lead] + (1,) * (ndim - arr.ndim) + arr.shape[lead:]
    return arr.reshape(shape)


def normalize_maps(attn: np.ndarray) -> np.ndarray:
    """Divide each ``G x G`` map by its sum over cells, so it is a distribution over cells.

    The captured cells sum to the image attention mass (< 1); normalising separates *where*
    the model looks in the image from *how much* it looks at the image. Maps whose sum is
    zero (or not finite) become all-NaN rather than a division by zero.
    """
    a = _check_maps(attn)
    total = a.sum(axis=(-2, -1), keepdims=True)
    ok = np.isfinite(total) & (total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(ok, a / np.where(ok, total, 1.0), np.nan)
    return out


def _flat_cells(attn: np.ndarray) -> np.ndarray:
    """Normalised maps with the grid flattened: ``[..., G, G] -> [..., G*G]``."""
    p = normalize_maps(attn)
    return p.reshape(p.shape[:-2] + (p.shape[-2] * p.shape[-1],))


def _binary_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    lab = np.asarray(labels)
    if lab.dtype == bool:
        return lab
    if lab.dtype == object or not np.issubdtype(lab.dtype, np.number):
        raise VislensError(f"{name}: expected bool or 0/1 values, got dtype {lab.dtype}")
    bad = ~np.isin(lab, (0, 1))
    if bad.any():
        raise VislensError(
            f"{name}: expected bool or 0/1 values, got {lab[bad].ravel()[0]!r}"
        )
    return lab.astype(bool)


def _check_1d_pair(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = _as_float(scores, "scores")
    y = _binary_labels(labels)
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise VislensError(
            f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}"
        )
    return s, y


# --------------------------------------------------------------------------- overlap


def overlap(
    attn: np.ndarray,
    mask: np.ndarray,
    *,
    reduce_heads: Literal["none", "mean"] = "none",
) -> np.ndarray:
    """Cosine similarity between each attention map and the object mask.

    Measures whether the answer position looks at the objects the question is about
    (the paper's "focus area" alignment). Both are flattened over the ``G x G`` cells; the
    map is first normalised to sum 1 over cells (cosine is scale-invariant, but a map with
    zero total attention has no direction and gives NaN, as does an all-zero mask).

    ``attn`` is ``[..., G, G]`` (typically ``[N, L, H, G, G]``); ``mask`` is ``[G, G]``,
    ``[N, G, G]`` (its sample axis lines up with ``attn``'s first axis and it broadcasts
    over layers/heads) or any shape broadcastable to ``attn``. With ``reduce_heads="mean"``
    the raw attention is averaged over the head axis (the one just before the grid, axis
    ``-3``) before the cosine, i.e. the overlap of the head-mean map, which weights each
    head by how much image attention it has; the result then lacks that axis.

    Returns the cosine per map: ``[N, L, H]`` (or ``[N, L]`` with ``"mean"``), in [0, 1]
    for non-negative inputs.
    """
    a = _check_maps(attn)
    m = _check_maps(mask, "mask")
    if a.shape[-2:] != m.shape[-2:]:
        raise VislensError(f"mask grid {m.shape[-2:]} does not match attention grid {a.shape[-2:]}")
    if reduce_heads == "mean":
        if a.ndim < 3:
            raise VislensError(f"reduce_heads='mean' needs a head axis before the grid, got shape {a.shape}")
        a = a.mean(axis=-3)
    elif reduce_heads != "none":
        raise VislensError(f"reduce_heads: expected 'none' or 'mean', got {reduce_heads!r}")
    m = _align_leading(m, a.ndim, 2, "mask")
    try:
        np.broadcast_shapes(a.shape, m.shape)
    except ValueError:
        raise VislensError(f"mask shape {np.shape(mask)} does not broadcast against attention {a.shape}") from None
    # cosine is scale-invariant, so normalising the map first would change nothing but cost
    # a full pass; a map without positive finite total has no direction -> NaN
    dot = np.einsum("...ij,...ij->...", a, m)
    a_norm = np.sqrt(np.einsum("...ij,...ij->...", a, a))
    m_norm = np.sqrt(np.einsum("...ij,...ij->...", m, m))
    total = a.sum(axis=(-2, -1))
    ok = np.isfinite(total) & (total > 0) & (m_norm > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (a_norm * m_norm)
    return np.where(ok, cos, np.nan).astype(np.float64, copy=False)


# --------------------------------------------------------------------------- AUROC


class AurocResult(NamedTuple):
    """AUROC with the class counts it was computed from (NaN when undefined)."""

    auroc: float
    n_pos: int
    n_neg: int


def auroc(scores: np.ndarray, labels: np.ndarray) -> AurocResult:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (scikit-learn).

    Positive class = ``True``/1 (for correctness prediction: the answer was correct).
    Samples whose score is NaN/inf (e.g. overlap of an all-zero map) are dropped;
    ``n_pos``/``n_neg`` count the samples actually used. When either class is absent the
    AUROC is undefined and reported as NaN -- not 0.5, which would read as "no signal".
    """
    s, y = _check_1d_pair(scores, labels)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return AurocResult(float("nan"), n_pos, n_neg)
    return AurocResult(float(roc_auc_score(y, s)), n_pos, n_neg)


def per_layer_auroc(
    scores: np.ndarray,
    correct: np.ndarray,
    *,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """AUROC of a per-layer score (e.g. head-mean overlap) for predicting correctness.

    ``scores`` is ``[N, L]``, ``correct`` is ``[N]``. Returns one row per layer with columns
    ``layer`` (``layers[i]`` if given, else the column index), ``auroc``, ``n_pos``,
    ``n_neg``; see :func:`auroc` for NaN handling.
    """
    s = _as_float(scores, "scores")
    if s.ndim != 2:
        raise VislensError(f"scores: expected [N, L], got shape {s.shape}")
    y = _binary_labels(correct, "correct")
    if y.shape != (s.shape[0],):
        raise VislensError(f"correct: expected shape ({s.shape[0]},), got {y.shape}")
    layer_ids = list(range(s.shape[1])) if layers is None else [int(x) for x in layers]
    if len(layer_ids) != s.shape[1]:
        raise VislensError(f"layers: {len(layer_ids)} ids for {s.shape[1]} score columns")
    rows = [auroc(s[:, j], y) for j in range(s.shape[1])]
    return pd.DataFrame(
        {
            "layer": pd.array(layer_ids, dtype="int64"),
            "auroc": np.array([r.auroc for r in rows], dtype=np.float64),
            "n_pos": pd.array([r.n_pos for r in rows], dtype="int64"),
            "n_neg": pd.array([r.n_neg for r in rows], dtype="int64"),
        }
    )


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` via :func:`sklearn.metrics.roc_curve`.

    Non-finite scores are dropped as in :func:`auroc`. Raises :class:`VislensError` when a
    class is missing, since the curve is then undefined.
    """
    s, y = _check_1d_pair(scores, labels)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    if y.all() or not y.any():
        raise VislensError(
            f"roc: need both classes, got {int(y.sum())} positive and {int((~y).sum())} negative"
        )
    fpr, tpr, thresholds = roc_curve(y, s)
    return fpr, tpr, thresholds


def calibration_aurocs(
    confidence: np.ndarray,
    attn_sum: np.ndarray,
    attn_max: np.ndarray,
    correct: np.ndarray,
) -> pd.DataFrame:
    """AUROC of three per-sample signals for predicting correctness (paper Figure 18).

    ``confidence`` is the max first-token probability; ``attn_sum`` and ``attn_max`` are
    the total and the largest cell of the image attention (e.g. ``attn.sum((-2, -1))`` and
    ``attn.max((-2, -1))`` at a chosen layer, head-mean). Each is ``[N]``. Returns rows
    ``confidence``, ``attn_sum``, ``attn_max`` with columns ``signal``, ``auroc``,
    ``n_pos``, ``n_neg``.
    """
    signals = {"confidence": confidence, "attn_sum": attn_sum, "attn_max": attn_max}
    rows = [(name, *auroc(values, correct)) for name, values in signals.items()]
    df = pd.DataFrame(rows, columns=["signal", "auroc", "n_pos", "n_neg"])
    return df.astype({"auroc": "float64", "n_pos": "int64", "n_neg": "int64"})


# --------------------------------------------------------------------------- attention share


class AttentionShare(NamedTuple):
    """Image tokens' share of the sequence vs their share of the attention (Figure 3)."""

    token_share: np.ndarray
    attention_share: np.ndarray


def attention_share(
    image_mass: np.ndarray,
    text_mass: np.ndarray,
    n_image_tokens: int | np.ndarray,
    n_text_tokens: int | np.ndarray,
) -> AttentionShare:
    """Compare how much of the prompt is image with how much of the attention goes there.

    ``token_share = n_image / (n_image + n_text)`` and
    ``attention_share = image_mass / (image_mass + text_mass)`` -- the image share of the
    attention that reaches prompt tokens. The paper's Figure 3 finding is that image tokens
    are most of the sequence but receive a small share of the attention.

    ``image_mass``/``text_mass`` are e.g. ``[N, L, H]``; token counts are scalars or ``[N]``
    (aligned with the sample axis). Both outputs have the shape of ``image_mass``; a zero
    denominator gives NaN.
    """
    im = _as_float(image_mass, "image_mass")
    tx = _as_float(text_mass, "text_mass")
    if im.shape != tx.shape:
        raise VislensError(f"image_mass {im.shape} and text_mass {tx.shape} differ in shape")
    ni = _as_float(n_image_tokens, "n_image_tokens")
    nt = _as_float(n_text_tokens, "n_text_tokens")
    if (ni < 0).any() or (nt < 0).any():
        raise VislensError("token counts must be non-negative")
    ni = _align_leading(ni, im.ndim, 0, "n_image_tokens")
    nt = _align_leading(nt, im.ndim, 0, "n_text_tokens")
    with np.errstate(invalid="ignore", divide="ignore"):
        tok = ni / (ni + nt)
        att = im / (im + tx)
    try:
        tok = np.broadcast_to(tok, im.shape).copy()
    except ValueError:
        raise VislensError(
            f"token counts {np.shape(n_image_tokens)} do not broadcast against masses {im.shape}"
        ) from None
    return AttentionShare(token_share=tok, attention_share=att)


# --------------------------------------------------------------------------- distribution shape


def attention_entropy(attn: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each map as a distribution over image cells (Appendix E.1, Eq. 4).

    Eq. 4 is the Shannon entropy ``H = -sum_i p_i log p_i`` of the normalised image
    attention ``p_i = a_i / sum_j a_j`` over the ``G*G`` cells: low = focused, high =
    spread out; ``log(G*G)`` for a uniform map. Computed with :func:`scipy.stats.entropy`.
    Values depend on the analysis grid, so compare only at equal ``G``. ``[..., G, G] ->
    [...]``; an all-zero map gives NaN.
    """
    p = _flat_cells(attn)
    bad = np.isnan(p).any(axis=-1)
    h = _scipy_entropy(np.where(bad[..., None], 1.0, p), axis=-1)
    return np.where(bad, np.nan, h).astype(np.float64, copy=False)


def attention_skewness(attn: np.ndarray) -> np.ndarray:
    """Skewness of the attention values over image cells (Appendix E.1, Eq. 5).

    Eq. 5 treats the ``G*G`` cell values of one map as a sample and takes its
    Fisher-Pearson skewness ``g1 = m3 / m2**1.5`` (population moments, scipy's default
    ``bias=True``): large positive = a few cells hold much more attention than the rest.
    Skewness is scale-invariant, so it is the same on raw or normalised maps (normalised
    here). ``[..., G, G] -> [...]``; a constant (e.g. uniform) map has zero variance and an
    all-zero map no distribution, and both give NaN.
    """
    p = _flat_cells(attn)
    with warnings.catch_warnings():
        # scipy warns (and returns NaN) for constant rows; NaN is the documented answer.
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(_scipy_skew(p, axis=-1), dtype=np.float64)


def layer_variance(
    attn: np.ndarray,
    *,
    per: Literal["sample", "cell"] = "sample",
) -> np.ndarray:
    """Variance across layers of each sample's image attention (Figure 7, left).

    ``attn`` is ``[N, L, H, G, G]`` (or ``[N, L, G, G]``); axes between the layer axis and
    the grid (heads) are averaged first, so each layer contributes its head-mean map.
    Variance is the population variance (``ddof=0``) over the ``L`` layers given (slice the
    layers first to restrict it).

    - ``per="sample"`` (default): per sample, the variance over layers of the total image
      attention mass (sum over cells of the head-mean map) -> ``[N]``. This says how much
      the amount of looking at the image changes from layer to layer; it equals
      ``np.var(image_mass.mean(-1), axis=1)`` on the capture's ``image_mass[N, L, H]``
      (up to float16 rounding of the stored cells).
    - ``per="cell"``: per sample and cell, the variance over layers of that cell's
      head-mean attention -> ``[N, G, G]``; average over cells for one number per sample.
    """
    a = _check_maps(attn, min_ndim=4)
    head_axes = tuple(range(2, a.ndim - 2))
    if head_axes:
        a = a.mean(axis=head_axes)  # [N, L, G, G]
    if per == "sample":
        return a.sum(axis=(-2, -1)).astype(np.float64).var(axis=1)
    if per == "cell":
        return a.astype(np.float64, copy=False).var(axis=1)
    raise VislensError(f"per: expected 'sample' or 'cell', got {per!r}")
