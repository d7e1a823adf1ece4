"""vislens.metrics against hand-computed cases and scikit-learn / scipy."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy, skew
from sklearn.metrics import roc_auc_score, roc_curve

from vislens import metrics
from vislens.errors import VislensError


def _map(*cells: tuple[int, int], g: int = 2, value: float = 1.0) -> np.ndarray:
    a = np.zeros((g, g))
    for i, j in cells:
        a[i, j] = value
    return a


# --------------------------------------------------------------------------- overlap


def test_overlap_hand_cases() -> None:
    mask = _map((0, 0))
    assert metrics.overlap(_map((0, 0), value=0.3), mask) == pytest.approx(1.0)  # all on the object
    assert metrics.overlap(_map((1, 1), value=0.3), mask) == pytest.approx(0.0)  # orthogonal
    half = _map((0, 0), (0, 1))
    uniform = np.full((2, 2), 0.05)
    assert metrics.overlap(uniform, half) == pytest.approx(1 / math.sqrt(2))


def test_overlap_zero_map_or_mask_is_nan() -> None:
    assert np.isnan(metrics.overlap(np.zeros((2, 2)), _map((0, 0))))
    assert np.isnan(metrics.overlap(_map((0, 0)), np.zeros((2, 2))))


def test_overlap_broadcasts_sample_mask_over_layers_and_heads() -> None:
    rng = np.random.default_rng(0)
    n, L, h, g = 3, 4, 5, 6
    attn = rng.random((n, L, h, g, g)).astype(np.float16) * np.float16(0.01)
    mask = (rng.random((n, g, g)) > 0.7).astype(np.float64)
    out = metrics.overlap(attn, mask)
    assert out.shape == (n, L, h) and out.dtype == np.float64
    a = attn[1, 2, 3].astype(np.float64).ravel()
    m = mask[1].ravel()
    assert out[1, 2, 3] == pytest.approx(a @ m / (np.linalg.norm(a) * np.linalg.norm(m)))

    mean = metrics.overlap(attn, mask, reduce_heads="mean")
    assert mean.shape == (n, L)
    head_mean = attn[2, 1].astype(np.float64).mean(axis=0).ravel()
    m = mask[2].ravel()
    assert mean[2, 1] == pytest.approx(head_mean @ m / (np.linalg.norm(head_mean) * np.linalg.norm(m)))


def test_overlap_is_row_independent() -> None:
    rng = np.random.default_rng(1)
    attn = rng.random((6, 2, 3, 4, 4))
    mask = rng.random((6, 4, 4))
    full = metrics.overlap(attn, mask)
    chunks = np.concatenate([metrics.overlap(attn[i : i + 2], mask[i : i + 2]) for i in range(0, 6, 2)])
    # relative: einsum may take another summation path for another batch shape; any mixing
    # of rows would be off by far more than rounding
    np.testing.assert_allclose(full, chunks, rtol=1e-12, atol=0)


def test_overlap_rejects_bad_shapes() -> None:
    with pytest.raises(VislensError):
        metrics.overlap(np.ones((2, 3, 3)), np.ones((2, 4, 4)))
    with pytest.raises(VislensError):
        metrics.overlap(np.ones((2, 3, 3)), np.ones((5, 3, 3)))
    with pytest.raises(VislensError):
        metrics.overlap(np.ones((2, 3, 3)), np.ones((2, 3, 3)), reduce_heads="max")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- AUROC


def test_auroc_matches_sklearn_and_counts() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7])
    labels = np.array([False, False, True, True, True])
    res = metrics.auroc(scores, labels)
    assert res.auroc == pytest.approx(roc_auc_score(labels, scores))
    assert (res.n_pos, res.n_neg) == (3, 2)


def test_auroc_one_class_is_nan_not_half() -> None:
    res = metrics.auroc(np.array([0.1, 0.5, 0.9]), np.array([1, 1, 1]))
    assert math.isnan(res.auroc)
    assert (res.n_pos, res.n_neg) == (3, 0)
    res = metrics.auroc(np.array([0.1, 0.5]), np.array([False, False]))
    assert math.isnan(res.auroc) and (res.n_pos, res.n_neg) == (0, 2)


def test_auroc_drops_nan_scores() -> None:
    res = metrics.auroc(np.array([np.nan, np.nan]), np.array([True, False]))
    assert math.isnan(res.auroc) and (res.n_pos, res.n_neg) == (0, 0)
    res = metrics.auroc(np.array([0.2, np.nan, 0.9, 0.1]), np.array([False, True, True, False]))
    assert res.auroc == pytest.approx(1.0) and (res.n_pos, res.n_neg) == (1, 2)


def test_auroc_rejects_non_binary_labels() -> None:
    with pytest.raises(VislensError):
        metrics.auroc(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(VislensError):
        metrics.auroc(np.array([0.1, 0.2]), np.array([0, 1, 1]))


def test_per_layer_auroc_equals_sklearn_per_column() -> None:
    rng = np.random.default_rng(2)
    correct = rng.random(40) > 0.4
    scores = rng.random((40, 5)) + 0.3 * correct[:, None] * np.arange(5)
    df = metrics.per_layer_auroc(scores, correct)
    assert list(df.columns) == ["layer", "auroc", "n_pos", "n_neg"]
    assert df["layer"].tolist() == [0, 1, 2, 3, 4]
    for j in range(5):
        assert df.loc[j, "auroc"] == pytest.approx(roc_auc_score(correct, scores[:, j]))
    assert (df["n_pos"] == correct.sum()).all() and (df["n_neg"] == (~correct).sum()).all()
    named = metrics.per_layer_auroc(scores, correct, layers=[10, 12, 14, 16, 18])
    assert named["layer"].tolist() == [10, 12, 14, 16, 18]


def test_per_layer_auroc_undefined_layer() -> None:
    scores = np.array([[0.1, np.nan], [0.9, np.nan], [0.5, 0.2]])
    df = metrics.per_layer_auroc(scores, np.array([False, True, True]))
    assert df.loc[0, "auroc"] == pytest.approx(1.0)
    assert math.isnan(df.loc[1, "auroc"]) and df.loc[1, "n_pos"] == 1 and df.loc[1, "n_neg"] == 0


def test_roc_wraps_sklearn() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    fpr, tpr, thr = metrics.roc(scores, labels)
    efpr, etpr, ethr = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    np.testing.assert_allclose(thr, ethr)
    with pytest.raises(VislensError):
        metrics.roc(scores, np.ones(4, dtype=bool))


def test_calibration_aurocs() -> None:
    correct = np.array([True, True, False, False, True])
    conf = np.array([0.9, 0.8, 0.3, 0.6, 0.7])
    asum = np.array([0.1, 0.2, 0.3, 0.4, 0.05])
    amax = np.array([0.01, 0.03, 0.02, 0.05, np.nan])
    df = metrics.calibration_aurocs(conf, asum, amax, correct)
    assert df["signal"].tolist() == ["confidence", "attn_sum", "attn_max"]
    assert df.loc[0, "auroc"] == pytest.approx(roc_auc_score(correct, conf))
    assert df.loc[1, "auroc"] == pytest.approx(roc_auc_score(correct, asum))
    assert df.loc[2, "auroc"] == pytest.approx(roc_auc_score(correct[:4], amax[:4]))
    assert df["n_pos"].tolist() == [3, 3, 2] and df["n_neg"].tolist() == [2, 2, 2]


# --------------------------------------------------------------------------- attention share


def test_attention_share() -> None:
    image_mass = np.array([[[0.1, 0.2]], [[0.3, 0.0]]])  # [N=2, L=1, H=2]
    text_mass = np.array([[[0.9, 0.6]], [[0.3, 0.0]]])
    res = metrics.attention_share(image_mass, text_mass, np.array([576, 144]), 24)
    assert res.token_share.shape == res.attention_share.shape == (2, 1, 2)
    np.testing.assert_allclose(res.token_share[0], 576 / 600)
    np.testing.assert_allclose(res.token_share[1], 144 / 168)
    np.testing.assert_allclose(res.attention_share[0, 0], [0.1, 0.25])
    assert res.attention_share[1, 0, 0] == pytest.approx(0.5)
    assert np.isnan(res.attention_share[1, 0, 1])  # no attention on the prompt at all
    with pytest.raises(VislensError):
        metrics.attention_share(image_mass, text_mass[:1], 576, 24)


# --------------------------------------------------------------------------- entropy / skewness


def test_entropy_uniform_576_cells_is_log_576() -> None:
    uniform = np.full((2, 24, 24), 0.1 / 576, dtype=np.float16)
    np.testing.assert_allclose(metrics.attention_entropy(uniform), np.log(576), rtol=1e-6)


def test_entropy_hand_cases_and_scipy() -> None:
    assert metrics.attention_entropy(_map((0, 1), value=0.2)) == pytest.approx(0.0)
    assert metrics.attention_entropy(_map((0, 0), (1, 1), value=0.2)) == pytest.approx(np.log(2))
    assert np.isnan(metrics.attention_entropy(np.zeros((2, 2))))
    rng = np.random.default_rng(3)
    attn = rng.random((3, 2, 5, 5))
    ent = metrics.attention_entropy(attn)
    assert ent.shape == (3, 2)
    assert ent[2, 1] == pytest.approx(entropy(attn[2, 1].ravel()))


def test_value_skewness_matches_scipy_on_random_maps() -> None:
    rng = np.random.default_rng(4)
    attn = rng.exponential(size=(4, 3, 2, 6, 6)) * 1e-3
    sk = metrics.attention_value_skewness(attn)
    assert sk.shape == (4, 3, 2)
    expected = skew(attn.reshape(4, 3, 2, 36), axis=-1)
    np.testing.assert_allclose(sk, expected, rtol=1e-10)
    # scale-invariant: raw and normalised cells give the same skewness
    assert sk[0, 0, 0] == pytest.approx(skew(attn[0, 0, 0].ravel() * 7.0))


def test_value_skewness_hand_case_and_undefined() -> None:
    # one hot cell among four: values (1, 0, 0, 0): mean 1/4, m2 = 3/16, m3 = 9/64 * 1/4 ... -> 2/sqrt(3)
    assert metrics.attention_value_skewness(_map((0, 0))) == pytest.approx(2 / math.sqrt(3))
    assert np.isnan(metrics.attention_value_skewness(np.full((2, 2), 0.25)))
    assert np.isnan(metrics.attention_value_skewness(np.zeros((2, 2))))


def _eq5(cells: np.ndarray) -> float:
    """Eq. 5 written out as in the paper, by plain loops over the token index."""
    p = cells.ravel() / cells.sum()
    mu = sum(j * pj for j, pj in enumerate(p))
    var = sum((j - mu) ** 2 * pj for j, pj in enumerate(p))
    return sum((j - mu) ** 3 * pj for j, pj in enumerate(p)) / var ** 1.5


def test_skewness_is_eq5_over_token_positions_hand_case() -> None:
    # row-major j = 0, 1, 2, 3 with P = (.5, .25, .25, 0): mu = .75, var = .6875,
    # third central moment = .28125 -> S = .28125 / .6875**1.5
    a = np.array([[0.5, 0.25], [0.25, 0.0]]) * 0.3  # raw masses; normalised inside
    assert metrics.attention_skewness(a) == pytest.approx(0.28125 / 0.6875 ** 1.5, rel=1e-12)
    # the mirror image (mass late) has the opposite sign; a symmetric map has S = 0
    assert metrics.attention_skewness(a[::-1, ::-1]) == pytest.approx(-0.28125 / 0.6875 ** 1.5)
    assert abs(metrics.attention_skewness(np.full((24, 24), 0.1))) < 1e-12
    # it is positional, not the skewness of the values: permuting cells changes it
    assert metrics.attention_skewness(a) != pytest.approx(metrics.attention_value_skewness(a))


def test_skewness_matches_plain_loops_on_random_maps_and_undefined() -> None:
    rng = np.random.default_rng(8)
    attn = rng.dirichlet(np.full(36, 0.3), size=(3, 2, 4)).reshape(3, 2, 4, 6, 6) * 0.4
    sk = metrics.attention_skewness(attn)
    assert sk.shape == (3, 2, 4) and sk.dtype == np.float64
    for idx in [(0, 0, 0), (2, 1, 3), (1, 0, 2)]:
        assert sk[idx] == pytest.approx(_eq5(attn[idx]), rel=1e-9)
    assert np.isnan(metrics.attention_skewness(_map((1, 0), value=0.3)))  # one cell: sigma = 0
    assert np.isnan(metrics.attention_skewness(np.zeros((2, 2))))
    # float16 storage of a 24 x 24 map, like a capture
    big = rng.dirichlet(np.full(576, 0.2), size=2).reshape(2, 24, 24).astype(np.float16)
    assert metrics.attention_skewness(big)[1] == pytest.approx(_eq5(big[1].astype(np.float64)), rel=1e-9)


# --------------------------------------------------------------------------- intervals


def test_wilson_interval_hand_values() -> None:
    # Wilson 95% for 8/10: centre (k + z^2/2)/(n + z^2), half-width z*sqrt(p(1-p)n + z^2/4)/(n + z^2)
    z = 1.959963984540054
    k, n = 8, 10
    p = k / n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(p * (1 - p) * n + z * z / 4) / (n + z * z)
    lo, hi = metrics.wilson_interval(k, n)
    assert (lo, hi) == (pytest.approx(centre - half), pytest.approx(centre + half))
    lo, hi = metrics.wilson_interval(np.array([0, 5]), np.array([5, 5]))
    assert lo[0] == 0 and 0 < hi[0] < 1 and hi[1] == 1 and lo[1] > 0
    assert all(np.isnan(metrics.wilson_interval(0, 0)))
    with pytest.raises(VislensError):
        metrics.wilson_interval(3, 2)


def test_weighted_auroc_equals_sklearn_on_each_resample() -> None:
    rng = np.random.default_rng(9)
    n = 60
    scores = np.round(rng.normal(size=n), 1)  # many ties
    y = rng.random(n) < 0.4
    idx = metrics.bootstrap_indices(n, 50, seed=3)
    got = metrics.weighted_auroc(scores, y, metrics.resample_counts(idx, n))
    for b in range(50):
        yb = y[idx[b]]
        want = roc_auc_score(yb, scores[idx[b]]) if 0 < yb.sum() < n else np.nan
        assert got[b] == pytest.approx(want, rel=1e-12, nan_ok=True)


def test_bootstrap_indices_paired_stratified_and_deterministic() -> None:
    strata = np.array(["a"] * 5 + ["b"] * 3)
    idx = metrics.bootstrap_indices(8, 200, seed=1, strata=strata)
    assert idx.shape == (200, 8)
    assert (idx[:, :5] < 5).all() and (idx[:, 5:] >= 5).all()  # group sizes kept
    np.testing.assert_array_equal(idx, metrics.bootstrap_indices(8, 200, seed=1, strata=strata))
    counts = metrics.resample_counts(idx, 8)
    assert (counts.sum(axis=1) == 8).all()
    assert counts[7, 2] == (idx[7] == 2).sum()


def test_auroc_interval_covers_the_auroc_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(10)

    def width(n):
        y = np.arange(n) % 2 == 0
        s = y * 0.8 + rng.normal(size=n)
        lo, hi = metrics.auroc_interval(s, y, n_boot=400)
        assert lo < metrics.auroc(s, y).auroc < hi
        return hi - lo

    assert width(800) < width(50)
    assert all(np.isnan(metrics.auroc_interval(np.ones(5), np.ones(5, bool))))


def test_per_layer_auroc_interval_columns() -> None:
    rng = np.random.default_rng(11)
    y = rng.random(80) < 0.5
    s = np.stack([y + rng.normal(size=80), rng.normal(size=80)], axis=1)
    df = metrics.per_layer_auroc(s, y, n_boot=300)
    assert list(df.columns) == ["layer", "auroc", "n_pos", "n_neg", "auroc_low", "auroc_high"]
    assert (df["auroc_low"] < df["auroc"]).all() and (df["auroc"] < df["auroc_high"]).all()
    assert df.loc[0, "auroc_low"] > 0.5 > df.loc[1, "auroc_low"]


# --------------------------------------------------------------------------- layer variance


def test_layer_variance_sample_is_variance_of_mass_over_layers() -> None:
    attn = np.zeros((1, 3, 2, 2, 2))  # N=1, L=3, H=2
    attn[0, 0, :, 0, 0] = [0.1, 0.3]  # layer 0 head-mean mass 0.2
    attn[0, 1, :, 1, 1] = [0.4, 0.4]  # 0.4
    attn[0, 2, :, 0, 1] = [0.0, 0.0]  # 0.0
    out = metrics.layer_variance(attn)
    assert out.shape == (1,)
    assert out[0] == pytest.approx(np.var([0.2, 0.4, 0.0]))
    image_mass = attn.sum(axis=(-2, -1))
    assert out[0] == pytest.approx(np.var(image_mass.mean(-1), axis=1)[0])


def test_layer_variance_per_cell() -> None:
    rng = np.random.default_rng(5)
    attn = rng.random((2, 4, 3, 5, 5))
    out = metrics.layer_variance(attn, per="cell")
    assert out.shape == (2, 5, 5)
    assert out[1, 2, 3] == pytest.approx(np.var(attn[1, :, :, 2, 3].mean(axis=1)))
    no_heads = metrics.layer_variance(attn.mean(axis=2), per="cell")
    np.testing.assert_allclose(out, no_heads)
    with pytest.raises(VislensError):
        metrics.layer_variance(attn[:, 0, 0])
    with pytest.raises(VislensError):
        metrics.layer_variance(attn, per="head")  # type: ignore[arg-type]


def test_normalize_maps_returns_distributions() -> None:
    rng = np.random.default_rng(6)
    p = metrics.normalize_maps(rng.random((3, 4, 4)).astype(np.float16))
    np.testing.assert_allclose(p.sum(axis=(-2, -1)), 1.0)
    assert isinstance(metrics.per_layer_auroc(np.zeros((2, 1)), [0, 1]), pd.DataFrame)


def test_float32_maps_agree_with_float64_to_storage_precision() -> None:
    """float32 maps are reduced in float32 (fast streaming path); the results stay float64
    and agree with the float64 computation far below float16 storage rounding (~1e-3)."""
    rng = np.random.default_rng(7)
    a64 = rng.dirichlet(np.full(576, 0.3), size=(3, 4, 5)).reshape(3, 4, 5, 24, 24) * 0.4
    a64[0, 0, 0] = 0.0  # undefined map stays NaN
    a32 = a64.astype(np.float32)
    ref_in = a32.astype(np.float64)  # same values, float64 arithmetic
    mask = (rng.random((3, 24, 24)) > 0.8).astype(np.float32)
    pairs = [
        (metrics.overlap(a32, mask), metrics.overlap(ref_in, mask.astype(np.float64))),
        (metrics.overlap(a32, mask, reduce_heads="mean"),
         metrics.overlap(ref_in, mask.astype(np.float64), reduce_heads="mean")),
        (metrics.attention_entropy(a32), metrics.attention_entropy(ref_in)),
        (metrics.attention_value_skewness(a32), metrics.attention_value_skewness(ref_in)),
        (metrics.layer_variance(a32), metrics.layer_variance(ref_in)),
    ]
    for got, ref in pairs:
        assert got.dtype == np.float64 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-9)
    assert np.isnan(pairs[0][0][0, 0, 0]) and np.isnan(pairs[2][0][0, 0, 0])
    # Eq. 5 skewness: float32 sums, with rows at risk of cancellation redone in float64;
    # absolute error far below float16 storage, also for maps piled on a few edge cells
    focused = np.full((400, 24, 24), 1e-6)
    rng2 = np.random.default_rng(12)
    focused.reshape(400, -1)[np.arange(400), rng2.integers(0, 576, 400)] = 0.3
    focused.reshape(400, -1)[np.arange(200), rng2.integers(0, 576, 200)] += 0.01
    for maps in (a64, focused):
        got = metrics.attention_skewness(maps.astype(np.float32))
        ref = metrics.attention_skewness(maps.astype(np.float32).astype(np.float64))
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, ref, rtol=0, atol=5e-4)
        assert np.isnan(got).tolist() == np.isnan(ref).tolist()
    assert metrics.normalize_maps(a32).dtype == np.float32
