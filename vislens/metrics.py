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
from scipy.stats import skew as _scipy_skew
from sklearn.metrics import roc_auc_score, roc_curve

from .errors import VislensError

__all__ = [
    "AttentionShare",
    "AurocResult",
    "attention_entropy",
    "attention_share",
    "attention_skewness",
    "attention_value_skewness",
    "auroc",
    "auroc_interval",
    "bootstrap_indices",
    "calibration_aurocs",
    "layer_variance",
    "normalize_maps",
    "overlap",
    "per_layer_auroc",
    "percentile_interval",
    "resample_counts",
    "roc",
    "weighted_auroc",
    "wilson_interval",
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
    n_boot: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """AUROC of a per-layer score (e.g. head-mean overlap) for predicting correctness.

    ``scores`` is ``[N, L]``, ``correct`` is ``[N]``. Returns one row per layer with columns
    ``layer`` (``layers[i]`` if given, else the column index), ``auroc``, ``n_pos``,
    ``n_neg``; see :func:`auroc` for NaN handling. With ``n_boot > 0`` also
    ``auroc_low``, ``auroc_high``: the 95% bootstrap percentile interval over samples (the
    same resamples for every layer).
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
    df = pd.DataFrame(
        {
            "layer": pd.array(layer_ids, dtype="int64"),
            "auroc": np.array([r.auroc for r in rows], dtype=np.float64),
            "n_pos": pd.array([r.n_pos for r in rows], dtype="int64"),
            "n_neg": pd.array([r.n_neg for r in rows], dtype="int64"),
        }
    )
    if n_boot > 0:
        counts = resample_counts(bootstrap_indices(s.shape[0], n_boot, seed), s.shape[0]) \
            if s.shape[0] else np.zeros((n_boot, 0))
        ci = [percentile_interval(weighted_auroc(s[:, j], y, counts)) for j in range(s.shape[1])]
        df["auroc_low"] = np.array([c[0] for c in ci], dtype=np.float64)
        df["auroc_high"] = np.array([c[1] for c in ci], dtype=np.float64)
    return df


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


# --------------------------------------------------------------------------- intervals

#: bootstrap resamples used by default for 95% intervals
N_BOOT = 1000


def wilson_interval(k: int | np.ndarray, n: int | np.ndarray, level: float = 0.95
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion ``k / n`` (scipy's ``binomtest``), as fractions.

    Scalars or equal-shape arrays; ``n == 0`` gives NaN. Used for every accuracy a table
    reports: unlike the normal approximation it stays inside [0, 1] and is honest at 0% or
    100% and for small ``n``.
    """
    from scipy.stats import binomtest

    kk = np.asarray(k, dtype=np.int64)
    nn = np.asarray(n, dtype=np.int64)
    if kk.shape != nn.shape:
        raise VislensError(f"wilson_interval: k {kk.shape} and n {nn.shape} differ in shape")
    if ((kk < 0) | (kk > nn)).any():
        raise VislensError("wilson_interval: need 0 <= k <= n")
    lo = np.full(kk.shape, np.nan)
    hi = np.full(kk.shape, np.nan)
    for pos in np.ndindex(kk.shape):
        if nn[pos] == 0:
            continue
        ci = binomtest(int(kk[pos]), int(nn[pos])).proportion_ci(level, method="wilson")
        lo[pos], hi[pos] = ci.low, ci.high
    return (lo, hi) if kk.ndim else (float(lo), float(hi))


def bootstrap_indices(n: int, n_boot: int = N_BOOT, seed: int = 0,
                      strata: np.ndarray | None = None) -> np.ndarray:
    """``[n_boot, n]`` row indices of bootstrap resamples of ``n`` samples.

    With ``strata`` (``[n]`` labels), each resample draws within each stratum as many
    samples as it holds, so group sizes are kept (e.g. per relation or per capture file).
    Deterministic for a given ``seed``. Comparing conditions on the same samples uses the
    same indices for both (a paired bootstrap).
    """
    if n < 1 or n_boot < 1:
        raise VislensError(f"bootstrap: need n >= 1 and n_boot >= 1, got {n} and {n_boot}")
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    lab = np.asarray(strata)
    if lab.shape != (n,):
        raise VislensError(f"bootstrap: strata has shape {lab.shape}, expected ({n},)")
    out = np.empty((n_boot, n), dtype=np.int64)
    for value in pd.unique(lab):
        members = np.flatnonzero(lab == value)
        out[:, members] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
    return out


def percentile_interval(replicates: np.ndarray, level: float = 0.95,
                        min_defined: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates; NaN replicates (e.g. an AUROC of a
    resample with one class) are dropped, and the interval is NaN when fewer than
    ``min_defined`` of them are defined (too unstable to report)."""
    r = np.asarray(replicates, dtype=np.float64).ravel()
    ok = np.isfinite(r)
    if r.size == 0 or ok.mean() < min_defined:
        return float("nan"), float("nan")
    tail = 50 * (1 - level)
    lo, hi = np.percentile(r[ok], [tail, 100 - tail])
    return float(lo), float(hi)


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` for ``labels`` with per-sample ``weights`` ``[B, n]``, one per row.

    With integer weights = how often a bootstrap resample drew each sample, row ``b`` equals
    :func:`auroc` on that resample exactly (ties count one half), at the cost of one sort
    for all rows instead of one per resample. Non-finite scores are dropped; rows without
    both classes give NaN.
    """
    s, y = _check_1d_pair(scores, labels)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != s.size:
        raise VislensError(f"weights: expected [B, {s.size}], got shape {w.shape}")
    keep = np.isfinite(s)
    s, y, w = s[keep], y[keep], w[:, keep]
    if s.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first sample of each tied value
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each value
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """``[B, n]`` how often each sample appears in each resample of :func:`bootstrap_indices`."""
    idx = np.asarray(idx, dtype=np.int64)
    B = idx.shape[0]
    flat = (np.arange(B, dtype=np.int64)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=B * n).reshape(B, n)


def auroc_interval(scores: np.ndarray, labels: np.ndarray, *, n_boot: int = N_BOOT,
                   seed: int = 0, level: float = 0.95, strata: np.ndarray | None = None
                   ) -> tuple[float, float]:
    """Bootstrap percentile interval of :func:`auroc` over samples (NaN when undefined)."""
    s, y = _check_1d_pair(scores, labels)
    if s.size == 0:
        return float("nan"), float("nan")
    idx = bootstrap_indices(s.size, n_boot, seed, strata)
    return percentile_interval(weighted_auroc(s, y, resample_counts(idx, s.size)), level)


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
    spread out; ``log(G*G)`` for a uniform map. Values depend on the analysis grid, so
    compare only at equal ``G``. ``[..., G, G] -> [...]``; an all-zero map gives NaN.

    Computed without normalising the map first, in one pass over the cells:
    ``H = log S - sum_i a_i log a_i / S`` with ``S = sum_i a_i`` (``0 log 0 = 0``), in
    blocks so a streamed chunk is not copied whole, in the map's precision (float32 maps:
    see the module notes); equal to :func:`scipy.stats.entropy` of the normalised map (the tests check it).
    """
    a = _check_maps(attn)
    cells = a.shape[-2] * a.shape[-1]
    flat = a.reshape(-1, cells)
    total = np.empty(flat.shape[0], dtype=np.float64)
    spread = np.empty(flat.shape[0], dtype=np.float64)
    tiny = np.finfo(flat.dtype).tiny  # log of a zero cell is finite, times zero is 0
    buf = np.empty((min(4096, flat.shape[0]), cells), dtype=flat.dtype)  # reused per block
    for start in range(0, flat.shape[0], 4096):
        block = flat[start:start + 4096]
        alog = buf[:block.shape[0]]
        total[start:start + 4096] = block.sum(axis=-1)
        np.maximum(block, tiny, out=alog)
        with np.errstate(invalid="ignore"):
            np.log(alog, out=alog)
        alog *= block
        spread[start:start + 4096] = alog.sum(axis=-1)
    ok = np.isfinite(total) & (total > 0) & np.isfinite(spread)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.log(total) - spread / total
    return np.where(ok, h, np.nan).reshape(a.shape[:-2])


def attention_skewness(attn: np.ndarray) -> np.ndarray:
    """Positional skewness of each map over the token index (Appendix E.1, Eq. 5).

    Eq. 5 is the third standardised moment of the token index ``j`` under the normalised
    image attention ``P~_j = a_j / sum_k a_k``:
    ``S = sum_j (j - mu)**3 P~_j / sigma**3`` with ``mu = sum_j j P~_j`` and
    ``sigma**2 = sum_j (j - mu)**2 P~_j``. ``j`` runs over the ``G*G`` grid cells in
    row-major order (the order of the image tokens): S > 0 = the attention's bulk sits
    early (top of the image) with a tail towards later cells, S < 0 the reverse, 0 for a
    map symmetric about its mean (e.g. uniform). ``[..., G, G] -> [...]``; a map with all
    its attention on one cell (``sigma = 0``) or none at all gives NaN.

    This is not the skewness of the cell *values*: that is
    :func:`attention_value_skewness`.
    """
    a = _check_maps(attn)
    cells = a.shape[-2] * a.shape[-1]
    flat = a.reshape(-1, cells)
    # raw moments of the centred, scaled index u = (j - c) / c in [-1, 1] (skewness is
    # invariant to that affine map), so the central moments below cancel little
    c = max((cells - 1) / 2, 1.0)
    u = (np.arange(cells, dtype=np.float64) - (cells - 1) / 2) / c
    powers = np.stack([np.ones_like(u), u, u * u, u * u * u], axis=1)  # [G*G, 4]
    m = np.empty((flat.shape[0], 4), dtype=np.float64)
    if flat.dtype == np.float32:
        # fast path: float32 sums. The bound ``est`` on the rounding error in S overstates it
        # 3x or more (measured); rows where it exceeds 1e-3 (attention piled on a few cells
        # away from the centre) are redone in float64, so the error stays below ~3e-4, under
        # what the float16 storage of the maps already perturbs

        p32 = powers.astype(np.float32)
        for start in range(0, flat.shape[0], 4096):
            m[start:start + 4096] = flat[start:start + 4096] @ p32
        s, var, e1, e2 = _eq5_from_moments(m)
        delta = np.finfo(np.float32).eps * np.sqrt(cells)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            est = (delta * (1 + 3 * np.abs(e1) + 3 * np.abs(e2) + 6 * e1 * e1) / var ** 1.5
                   + 1.5 * np.abs(s) * delta * (1 + 2 * np.abs(e1)) / var)
        redo = np.flatnonzero(~(est < 1e-3))  # also NaN: degenerate or empty maps
        for start in range(0, redo.size, 4096):
            rows = redo[start:start + 4096]
            m[rows] = flat[rows].astype(np.float64) @ powers
    else:
        for start in range(0, flat.shape[0], 4096):
            m[start:start + 4096] = flat[start:start + 4096] @ powers
    s, var, _, _ = _eq5_from_moments(m)
    return s.reshape(a.shape[:-2])


def _eq5_from_moments(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(S, var, e1, e2)`` from raw moments ``m[:, k] = sum_j a_j u_j**k`` (k = 0..3)."""
    total = m[:, 0]
    ok = np.isfinite(total) & (total > 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        e1, e2, e3 = (m[:, k] / total for k in (1, 2, 3))
        var = e2 - e1 * e1
        third = e3 - 3 * e1 * e2 + 2 * e1 ** 3  # E[(u - mu)^3] from the raw moments
        # sigma = 0 up to rounding (all the attention on one cell): undefined
        degenerate = ~(var > 1e-12)
        s = third / np.abs(var) ** 1.5
    return np.where(ok & ~degenerate, s, np.nan), var, e1, e2


def attention_value_skewness(attn: np.ndarray) -> np.ndarray:
    """Skewness of the attention *values* over image cells (not the paper's Eq. 5).

    Treats the ``G*G`` cell values of one map as a sample and takes its Fisher-Pearson
    skewness ``g1 = m3 / m2**1.5`` (population moments, scipy's default ``bias=True``):
    large positive = a few cells hold much more attention than the rest. Scale-invariant,
    so raw or normalised maps agree. ``[..., G, G] -> [...]``; a constant (e.g. uniform)
    map and an all-zero map give NaN. The paper's skewness is the positional one,
    :func:`attention_skewness`.
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
