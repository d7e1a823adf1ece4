"""Steering and recording against an independent eager reference of the paper's method.

The reference computes the full attention matrix of every layer, multiplies the last row's
image-key logits by alpha before the mask (as the paper's modified eager attention does),
and reads the last row. vislens runs SDPA + a recomputed last row on a prefix cache.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_image
from vislens.decoding import BASELINE_KEY, DecodingEngine, parse_condition, run_conditions
from vislens.steering import Intervention, Steerer

QUESTION = "Where is the ball in relation to the box? Answer with left, right, on or under."
SHORT = "Where is the box?"
OPTIONS = ["Left", "Right", "On", "Under"]
ARCHS = ["llava", "llava_next", "qwen2_vl"]


class EagerReference:
    """Plain full-matrix eager attention with the paper's last-row image-logit scaling."""

    name = "vislens_test_eager_ref"

    def __init__(self):
        self.alpha = None  # [B] tensor or None
        self.image_keys = None  # [B, K]
        self.rows: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        w = torch.matmul(query, k.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
        if self.alpha is not None:
            last = w[:, :, -1, :]
            scaled = last * self.alpha[:, None, None]
            w = w.clone()
            w[:, :, -1, :] = torch.where(self.image_keys[:, None, :], scaled, last)
        if attention_mask is not None:
            w = w + attention_mask
        p = torch.softmax(w.float(), dim=-1).to(query.dtype)
        self.rows[module.layer_idx] = p[:, :, -1, :].detach().clone()
        return torch.matmul(p, v).transpose(1, 2).contiguous(), p

    def register(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(self.name, self)
        AttentionMaskInterface.register(self.name, eager_mask)


def reference_forward(adapter, batch, alpha, *, positions=True):
    """Full-sequence eager forward; returns (last logits [B, V], rows {layer: [B, H, K]})."""
    ref = EagerReference()
    ref.register()
    ref.alpha = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
    ref.image_keys = batch.image_keys
    model = adapter.model
    model.set_attn_implementation({"text_config": ref.name})
    try:
        kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision)
        if positions:
            kw["position_ids"] = batch.position_ids
        elif adapter.family == "qwen2_vl":
            kw["mm_token_type_ids"] = adapter.processor(
                images=[random_image(0)], text=batch.prompts, return_tensors="pt")["mm_token_type_ids"]
        with torch.no_grad():
            out = model(**kw)
    finally:
        model.set_attn_implementation({"text_config": "vislens"})
    return out.logits[:, -1].float(), ref.rows


def engine_step(adapter, batch, alpha):
    engine = DecodingEngine(adapter, max_new_tokens=1)
    with torch.no_grad():
        cache = engine.prefill(batch)
        key = BASELINE_KEY if alpha == 1.0 else ("scale", float(alpha), None, None)
        return engine.step(batch, cache, key, keep_rows=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_matches_eager_reference_single(tiny_adapter, arch, alpha):
    adapter = tiny_adapter(arch)
    batch = adapter.prepare([random_image(0)], [QUESTION])
    # the reference uses the model's own default positions (no padding: they must agree)
    ref_logits, ref_rows = reference_forward(adapter, batch, [alpha], positions=False)
    st = engine_step(adapter, batch, alpha)
    assert torch.allclose(st.logits, ref_logits, atol=1e-4), (st.logits - ref_logits).abs().max()
    assert sorted(st.rows) == sorted(ref_rows) == list(range(adapter.num_layers))
    for layer, row in ref_rows.items():
        assert torch.allclose(st.rows[layer], row.float(), atol=1e-4)
    if alpha != 1.0:  # the intervention visibly moves the output
        base = engine_step(adapter, batch, 1.0)
        assert (st.logits - base.logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_reference_and_single_runs(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    images = [random_image(1, (60, 40)), random_image(2, (44, 52))]
    batch = adapter.prepare(images, [QUESTION, SHORT])
    assert bool((batch.attention_mask[1] == 0).any()), "second prompt must be left-padded"
    alpha = [0.5, 2.0]
    ref_logits, ref_rows = reference_forward(adapter, batch, alpha)
    engine = DecodingEngine(adapter, max_new_tokens=1)
    with torch.no_grad():
        cache = engine.prefill(batch)
        with Steerer(batch.image_keys, [Intervention("scale", torch.tensor(alpha))]) as s:
            out = adapter.model(input_ids=batch.input_ids[:, -1:], attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids[..., -1:], use_cache=True,
                                **{engine._cache_kw: cache})
    got = out.logits[:, -1].float()
    assert torch.allclose(got, ref_logits, atol=1e-4)
    valid = batch.attention_mask.bool()
    for layer, row in ref_rows.items():
        for i in range(2):  # compare real (non-pad) keys only
            assert torch.allclose(s.records[layer][i][:, valid[i]], row[i][:, valid[i]].float(), atol=1e-4)
            assert bool((s.records[layer][i][:, ~valid[i]] == 0).all())
    # each sample alone gives the same answer-position logits as inside the padded batch
    for i, (img, q) in enumerate(zip(images, [QUESTION, SHORT])):
        single = adapter.prepare([img], [q])
        st = engine_step(adapter, single, alpha[i])
        assert torch.allclose(st.logits[0], got[i], atol=1e-4)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_prefix_cache_equals_full_steered_prefill(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    batch = adapter.prepare([random_image(3), random_image(4, (50, 50))], [QUESTION, SHORT])
    alpha = torch.tensor([2.0, 0.5])
    with torch.no_grad(), Steerer(batch.image_keys, [Intervention("scale", alpha)]) as s:
        full = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, **batch.vision)
    engine = DecodingEngine(adapter, max_new_tokens=1)
    with torch.no_grad():
        cache = engine.prefill(batch)
        with Steerer(batch.image_keys, [Intervention("scale", alpha)]) as s2:
            last = adapter.model(input_ids=batch.input_ids[:, -1:], attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids[..., -1:], use_cache=True,
                                 **{engine._cache_kw: cache})
    assert torch.allclose(full.logits[:, -1], last.logits[:, -1], atol=1e-4)
    for layer in s.records:
        assert torch.allclose(s.records[layer], s2.records[layer], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_one_is_the_unsteered_model(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    batch = adapter.prepare([random_image(5)], [QUESTION])
    with torch.no_grad():  # no Steerer armed: plain SDPA forward
        plain = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, **batch.vision).logits[:, -1]
    st = engine_step(adapter, batch, 1.0)
    assert torch.allclose(st.logits, plain.float(), atol=1e-5)


def test_engine_grid_and_masses_follow_the_recorded_row(tiny_adapter):
    adapter = tiny_adapter("llava")
    image = random_image(6, (48, 48))
    batch = adapter.prepare([image], [QUESTION])
    _, ref_rows = reference_forward(adapter, batch, [2.0])
    res = run_conditions(adapter, [image], [QUESTION], [OPTIONS], ["scaling:alpha=2"], max_new_tokens=1)[0]
    r = res["scaling-2"]
    pos = batch.image_keys[0].nonzero().flatten()
    for layer, row in ref_rows.items():
        expect = row[0][:, pos].reshape(-1, 24, 24).numpy()  # square image: grid == patch grid
        np.testing.assert_allclose(r.image_attention[layer], expect, atol=1e-5)
        np.testing.assert_allclose(r.image_mass[layer], row[0][:, pos].sum(-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(r.image_mass[layer] + r.text_mass[layer], 1.0, atol=1e-5)


def test_adaptvis_picks_alpha_on_the_right_side_of_beta(tiny_adapter):
    adapter = tiny_adapter("llava")
    images = [random_image(7), random_image(8), random_image(9)]
    qs = [QUESTION, SHORT, QUESTION]
    base = run_conditions(adapter, images, qs, [OPTIONS] * 3, ["baseline"], max_new_tokens=1)
    conf = np.array([r["baseline"].confidence for r in base])
    assert np.ptp(conf) > 0
    beta = float(np.sort(conf)[1])  # the middle one is >= beta -> sharpen; the lowest smooths
    conds = ["baseline", "scaling:alpha=0.5", "scaling:alpha=2",
             f"adaptvis:alpha1=0.5,alpha2=2,beta={beta!r}"]
    res = run_conditions(adapter, images, qs, [OPTIONS] * 3, conds, max_new_tokens=3)
    for i, r in enumerate(res):
        expect = 0.5 if conf[i] < beta else 2.0
        a = r["adaptvis"]
        assert a.alpha_used == expect
        same = r["scaling-0.5" if expect == 0.5 else "scaling-2"]
        assert a.text == same.text and a.confidence == pytest.approx(same.confidence)
        np.testing.assert_allclose(a.image_attention, same.image_attention)
        assert r["baseline"].confidence == pytest.approx(conf[i], abs=1e-6)
    assert {r["adaptvis"].alpha_used for r in res} == {0.5, 2.0}


def test_add_delta_equals_probability_factor(tiny_adapter):
    """Adding delta to image logits multiplies each image weight's odds by e^delta."""
    adapter = tiny_adapter("llava")
    image = random_image(10)
    res = run_conditions(adapter, [image], [QUESTION], [OPTIONS], ["baseline", "add:delta=0.7"],
                         max_new_tokens=1)[0]
    # only layer 0 sees identical inputs in both conditions (later layers differ by the edit)
    m0 = res["baseline"].image_mass[0]
    m1 = res["add+0.7"].image_mass[0]
    expect = m0 * np.exp(0.7) / (m0 * np.exp(0.7) + (1 - m0))
    np.testing.assert_allclose(m1, expect, rtol=1e-4)


def test_layer_and_head_selection_limits_the_edit(tiny_adapter):
    adapter = tiny_adapter("llava")
    image = random_image(11)
    res = run_conditions(adapter, [image], [QUESTION], [OPTIONS],
                         ["baseline", "scaling:alpha=3,layers=1,heads=0+2,name=sel"], max_new_tokens=1)[0]
    b, s = res["baseline"], res["sel"]
    np.testing.assert_allclose(s.image_mass[0], b.image_mass[0], atol=1e-6)  # layer 0 untouched
    np.testing.assert_allclose(s.image_mass[1][[1, 3]], b.image_mass[1][[1, 3]], atol=1e-6)
    assert np.abs(s.image_mass[1][[0, 2]] - b.image_mass[1][[0, 2]]).max() > 1e-3


def test_gqa_shapes_are_handled(tiny_adapter):
    adapter = tiny_adapter("llava")
    tc = adapter.text_config
    assert tc.num_key_value_heads < tc.num_attention_heads  # the tiny models use GQA


@pytest.mark.parametrize("spec, msg", [
    ("scaling:alpha=nan", "not finite"), ("scaling:alpha=inf", "not finite"),
    ("adaptvis:alpha1=0.5,alpha2=2,beta=1.5", "beta"), ("scaling", "missing alpha"),
    ("warp:alpha=1", "unknown condition method"), ("scaling:alpha=0", "> 0"),
    ("scaling:alpha=2,gamma=1", "unknown option 'gamma'"), ("scaling:alpha=x", "not a number"),
])
def test_bad_conditions_fail_with_one_line(spec, msg):
    from vislens.errors import VislensError

    with pytest.raises(VislensError) as e:
        parse_condition(spec)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_adaptvis_alone_uses_one_per_row_step_equal_to_scaling_steps(tiny_adapter):
    """Without scaling conditions to reuse, AdaptVis runs one step with a per-row alpha."""
    adapter = tiny_adapter("llava")
    images = [random_image(12), random_image(13), random_image(14)]
    qs = [QUESTION, SHORT, QUESTION]
    conf = np.array([r["baseline"].confidence for r in run_conditions(
        adapter, images, qs, [OPTIONS] * 3, ["baseline"], max_new_tokens=1)])
    beta = float(np.sort(conf)[1])
    spec = f"adaptvis:alpha1=0.5,alpha2=2,beta={beta!r}"
    engine = DecodingEngine(adapter, max_new_tokens=3)
    alone = engine.run(images, qs, [OPTIONS] * 3, [parse_condition(spec)])
    assert engine.forward_calls <= 1 + 1 + 3  # prefill, probe, one steered step + 2 continuation
    both = run_conditions(adapter, images, qs, [OPTIONS] * 3,
                          [spec, "scaling:alpha=0.5", "scaling:alpha=2"], max_new_tokens=3)
    assert {r["adaptvis"].alpha_used for r in alone} == {0.5, 2.0}
    for a, b in zip(alone, both):
        assert a["adaptvis"].text == b["adaptvis"].text
        assert a["adaptvis"].confidence == pytest.approx(b["adaptvis"].confidence, abs=1e-5)
        np.testing.assert_allclose(a["adaptvis"].image_attention, b["adaptvis"].image_attention, atol=1e-5)
