"""Fused settings over one shared copy of the prefix cache (vislens.shared_prefix).

References: torch SDPA over the prefix explicitly repeated per row (kernels differ: relative
tolerances), the engine with K repeated cache copies (``share_prefix=False``) and the engine
running one setting per pass (``max_fused_rows=1``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from conftest import random_image
from eager_reference import assert_close
from vislens import shared_prefix
from vislens.decoding import DecodingEngine, parse_condition

QUESTION = "Where is the ball in relation to the box? Answer with left, right, on or under."
SHORT = "Where is the box?"
OPTIONS = ["Left", "Right", "On", "Under"]
SWEEP = ["baseline"] + [f"scaling:alpha={a}" for a in (0.5, 0.8, 1.2, 1.5, 2.0)]


def _layer_and_reference(b=3, g=4, hkv=2, rep=2, n=7, s=3, d=4, dtype=torch.float32, seed=0):
    """A shared-prefix layer holding a suffix of ``s`` tokens, the query, and the same keys
    repeated per row (the reference layout)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    pk, pv = rnd(b, hkv, n, d), rnd(b, hkv, n, d)
    sk, sv = rnd(b * g, hkv, s, d), rnd(b * g, hkv, s, d)
    cache = DynamicCache()
    cache.update(pk, pv, 0)
    fork = shared_prefix.fork(cache, g)
    layer = fork.layers[0]
    keys, values = layer.update(sk, sv)
    q = rnd(b * g, hkv * rep, 1, d)
    full_k = torch.cat([pk.repeat_interleave(g, 0), sk], dim=-2)
    full_v = torch.cat([pv.repeat_interleave(g, 0), sv], dim=-2)
    return fork, layer, q, keys, values, full_k, full_v


def _sdpa(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=m).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_attention_over_shared_prefix_equals_sdpa_over_repeated_cache(mask_kind):
    fork, layer, q, keys, values, full_k, full_v = _layer_and_reference()
    r, total = q.shape[0], full_k.shape[-2]
    mask = None
    if mask_kind is not None:  # left padding that differs per sample (the same in its group)
        pad = torch.tensor([0, 2, 5]).repeat_interleave(4)
        mask = torch.arange(total)[None, :] >= pad[:, None]
        if mask_kind == "additive":
            mask = torch.zeros(r, total).masked_fill(~mask, torch.finfo(torch.float32).min)
    ref = _sdpa(q, full_k, full_v, mask)  # [R, 1, H, D]
    scale = q.shape[-1] ** -0.5
    assert_close(layer.attend(q, keys, values, mask, scale), ref, rel=1e-5)
    # the steerable route: logits [R, H, n+s], softmax, output
    logits = layer.logits(q, keys, scale)
    ref_logits = torch.matmul(q[:, :, 0].float()[:, :, None],
                              full_k.repeat_interleave(2, 1).transpose(-1, -2))[:, :, 0] * scale
    assert_close(logits, ref_logits, rel=1e-5)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float("-inf")) if mask.dtype == torch.bool \
            else logits + mask[:, None]
    assert_close(layer.output(torch.softmax(logits, -1), values), ref, rel=1e-5)
    fork.check()  # every handed-out suffix was attended through the shared path
    assert layer.get_seq_length() == total and fork.get_seq_length() == total


def test_bfloat16_shared_attention_is_close_to_fp32_sdpa():
    fork, layer, q, keys, values, full_k, full_v = _layer_and_reference(dtype=torch.bfloat16,
                                                                        n=40, d=16)
    out = layer.attend(q, keys, values, None, q.shape[-1] ** -0.5)
    assert out.dtype == torch.bfloat16
    assert_close(out, _sdpa(q, full_k, full_v, None), rel=2e-2)


def test_a_suffix_read_by_another_attention_is_refused():
    fork, layer, q, keys, values, *_ = _layer_and_reference()
    with pytest.raises(RuntimeError, match="without the 'vislens' attention"):
        with shared_prefix.armed(fork):
            pass  # the suffix handed out by update() was never attended through the prefix
    layer.attend(q, keys, values, None, 0.5)
    fork.check()


def test_only_plain_dynamic_caches_are_forked():
    assert not shared_prefix.eligible(DynamicCache())  # nothing prefilled
    with pytest.raises(TypeError):
        shared_prefix.fork(object(), 2)


def _compare(got, ref, conds, texts=True):
    for g, r in zip(got, ref):
        for c in conds:
            if texts:
                assert g[c.name].text == r[c.name].text, c.name
                assert g[c.name].first_token == r[c.name].first_token, c.name
            assert g[c.name].confidence == pytest.approx(r[c.name].confidence, rel=1e-5)
            assert_close(g[c.name].option_probs, r[c.name].option_probs)
            if r[c.name].image_attention is not None:
                assert_close(g[c.name].image_attention, r[c.name].image_attention)
                assert_close(g[c.name].image_mass, r[c.name].image_mass)
                for field in ("image_logit_mean", "image_logit_max"):  # -inf under knockout
                    a, e = getattr(g[c.name], field), getattr(r[c.name], field)
                    assert (a == e)[~np.isfinite(e)].all()
                    assert_close(a[np.isfinite(e)], e[np.isfinite(e)])


@pytest.mark.parametrize("arch,record", [("llava", False), ("llava", True), ("qwen2_vl", True)])
def test_sweep_settings_on_shared_prefix_equal_repeated_cache_and_one_pass_each(
        tiny_adapter, arch, record, monkeypatch):
    """Three samples of different prompt lengths (left padding) x six settings: the shared
    prefix gives every (sample, setting) row the answer of the repeated cache and of its own
    pass; a row mixed up with another sample's or setting's would differ."""
    adapter = tiny_adapter(arch)
    images = [random_image(40), random_image(41, (44, 52)), random_image(42)]
    qs = [QUESTION, SHORT, "Is the ball on the box?"]
    conds = [parse_condition(c) for c in SWEEP + ["add:delta=-1,layers=1", "knockout:heads=1"]]
    forks = []
    real_fork = shared_prefix.fork
    monkeypatch.setattr(shared_prefix, "fork", lambda *a: forks.append(a[1]) or real_fork(*a))
    kw = dict(max_new_tokens=5, record=record)
    shared = DecodingEngine(adapter, **kw)
    got = shared.run(images, qs, [OPTIONS] * 3, conds)
    assert forks == [len(conds)]  # all eight settings in one fused pass over one prefix
    repeated = DecodingEngine(adapter, share_prefix=False, **kw).run(images, qs, [OPTIONS] * 3, conds)
    alone = DecodingEngine(adapter, max_fused_rows=1, **kw)
    ref = alone.run(images, qs, [OPTIONS] * 3, conds)
    assert len(forks) == 1 and shared.forward_calls < alone.forward_calls
    _compare(got, repeated, conds)
    _compare(got, ref, conds)
    assert len({r[c.name].text for r in got for c in conds}) > 3  # settings do differ


def test_finished_rows_keep_their_answers(tiny_dir):
    """Rows that reach EOS early stay padded (nothing after EOS leaks into their text) while
    the others continue: a tiny LLaVA whose head prefers EOS under some settings only."""
    from vislens.models import load_model

    adapter = load_model(tiny_dir("llava"), dtype="float32", device="cpu")  # private copy
    eos = sorted(adapter.eos_token_ids)[0]
    head = adapter.model.get_output_embeddings().weight
    with torch.no_grad():
        head[eos] = 0.6 * torch.randn(head.shape[1], generator=torch.Generator().manual_seed(3))
    images = [random_image(50), random_image(51)]
    conds = [parse_condition(c) for c in SWEEP]
    kw = dict(max_new_tokens=6, record=False)
    got = DecodingEngine(adapter, **kw).run(images, [QUESTION, SHORT], [OPTIONS] * 2, conds)
    ref = DecodingEngine(adapter, max_fused_rows=1, **kw).run(images, [QUESTION, SHORT],
                                                              [OPTIONS] * 2, conds)
    _compare(got, ref, conds)
    lengths = {len(r[c.name].text.split()) for r in got for c in conds}
    assert len(lengths) > 1, lengths  # some rows stopped early, others did not
