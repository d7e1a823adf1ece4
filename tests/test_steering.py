"""Steering and recording against an independent eager reference of the paper's method.

The reference (tests/eager_reference.py) computes the full attention matrix of every layer,
multiplies the last row's image-key logits by alpha before the mask (as the paper's modified
eager attention does), and reads the last row. vislens runs SDPA + a recomputed last row on a
prefix cache. Floats from different kernels are compared with relative tolerances.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import random_image
from eager_reference import assert_close, reference_forward
from vislens.conditions import SettingKey
from vislens.decoding import BASELINE_KEY, DecodingEngine, parse_condition, run_conditions
from vislens.errors import VislensError
from vislens.steering import HookPoint, Intervention, Steerer, last_row_logits, vislens_attention

QUESTION = "Where is the ball in relation to the box? Answer with left, right, on or under."
SHORT = "Where is the box?"
OPTIONS = ["Left", "Right", "On", "Under"]
ARCHS = ["llava", "llava_next", "qwen2_vl"]


def midpoint_threshold(conf: np.ndarray) -> float:
    """A threshold halfway between the two lowest confidences, never on a data point; the
    gap must dwarf kernel rounding so every run puts each sample on the same side."""
    lo, hi = np.sort(conf)[:2]
    assert hi - lo > 1e-3, f"fixture confidences {conf} too close to split"
    return float((lo + hi) / 2)


def engine_step(adapter, batch, alpha):
    engine = DecodingEngine(adapter, max_new_tokens=1)
    with torch.no_grad():
        cache = engine.prefill(batch)
        if isinstance(alpha, SettingKey):
            key = alpha
        else:
            key = BASELINE_KEY if alpha == 1.0 else SettingKey("scale", float(alpha))
        return engine.step(batch, cache, key, keep_rows=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_matches_eager_reference_single(tiny_adapter, arch, alpha):
    adapter = tiny_adapter(arch)
    batch = adapter.prepare([random_image(0)], [QUESTION])
    # the reference uses the model's own default positions (no padding: they must agree)
    ref_logits, ref_rows = reference_forward(adapter, batch, [alpha], positions=False)
    st = engine_step(adapter, batch, alpha)
    assert_close(st.logits, ref_logits)
    assert sorted(st.rows) == sorted(ref_rows) == list(range(adapter.num_layers))
    for layer, row in ref_rows.items():
        assert_close(st.rows[layer], row)
    if alpha != 1.0:  # the intervention visibly moves the output (far beyond the tolerance)
        base = engine_step(adapter, batch, 1.0)
        assert (st.logits - base.logits).abs().max() > 1e-2 * base.logits.abs().max()


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
    assert_close(got, ref_logits)
    valid = batch.attention_mask.bool()
    for layer, row in ref_rows.items():
        for i in range(2):  # compare real (non-pad) keys only
            assert_close(s.records[layer][i][:, valid[i]], row[i][:, valid[i]])
            assert bool((s.records[layer][i][:, ~valid[i]] == 0).all())
    # each sample alone gives the same answer-position logits as inside the padded batch
    for i, (img, q) in enumerate(zip(images, [QUESTION, SHORT])):
        single = adapter.prepare([img], [q])
        st = engine_step(adapter, single, alpha[i])
        assert_close(st.logits[0], got[i])


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
    assert_close(last.logits[:, -1], full.logits[:, -1])
    assert sorted(s.records) == sorted(s2.records) == list(range(adapter.num_layers))
    for layer in s.records:
        assert_close(s2.records[layer], s.records[layer])


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_one_is_the_unsteered_model(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    batch = adapter.prepare([random_image(5)], [QUESTION])
    with torch.no_grad():  # no Steerer armed: plain SDPA forward
        plain = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, **batch.vision).logits[:, -1]
    st = engine_step(adapter, batch, 1.0)
    assert_close(st.logits, plain)


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
        assert_close(r.image_attention[layer], expect)
        assert_close(r.image_mass[layer], row[0][:, pos].sum(-1).numpy())
        assert_close(r.image_mass[layer] + r.text_mass[layer], np.ones(adapter.num_heads), rel=1e-5)


def test_adaptvis_picks_alpha_on_the_right_side_of_beta(tiny_adapter):
    adapter = tiny_adapter("llava")
    images = [random_image(7), random_image(8), random_image(9)]
    qs = [QUESTION, SHORT, QUESTION]
    base = run_conditions(adapter, images, qs, [OPTIONS] * 3, ["baseline"], max_new_tokens=1)
    conf = np.array([r["baseline"].confidence for r in base])
    beta = midpoint_threshold(conf)  # the lowest smooths, the other two sharpen
    conds = ["baseline", "scaling:alpha=0.5", "scaling:alpha=2",
             f"adaptvis:alpha1=0.5,alpha2=2,beta={beta!r}"]
    res = run_conditions(adapter, images, qs, [OPTIONS] * 3, conds, max_new_tokens=3)
    for i, r in enumerate(res):
        expect = 0.5 if conf[i] < beta else 2.0
        a = r["adaptvis"]
        assert a.alpha_used == expect
        same = r["scaling-0.5" if expect == 0.5 else "scaling-2"]
        # the same step serves both conditions: equal by construction, bit for bit
        assert a.text == same.text and a.confidence == same.confidence
        np.testing.assert_array_equal(a.image_attention, same.image_attention)
        assert r["baseline"].confidence == pytest.approx(conf[i], rel=1e-5)
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
    # layer 0 and the unselected heads of layer 1 see the same inputs through the same
    # kernels in both steps: identical, not just close
    np.testing.assert_array_equal(s.image_mass[0], b.image_mass[0])
    np.testing.assert_array_equal(s.image_mass[1][[1, 3]], b.image_mass[1][[1, 3]])
    assert np.abs(s.image_mass[1][[0, 2]] - b.image_mass[1][[0, 2]]).max() > 1e-3


def test_gqa_rows_match_repeated_kv():
    """Grouped-query attention: query head h reads kv head h // (H / Hkv), as repeat_kv does.

    vislens_attention (steered, recorded) against a plain computation with repeated K/V."""
    torch.manual_seed(0)
    b, h, hkv, q_len, k_len, d = 2, 8, 2, 5, 5, 16
    query, key, value = torch.randn(b, h, q_len, d), torch.randn(b, hkv, k_len, d), torch.randn(b, hkv, k_len, d)
    scaling = d ** -0.5
    mask = torch.triu(torch.full((q_len, k_len), float("-inf")), 1)[None, None].expand(b, 1, -1, -1)
    image_keys = torch.zeros(b, k_len, dtype=torch.bool)
    image_keys[:, 1:3] = True
    alpha = torch.tensor([2.0, 0.5])
    module = torch.nn.Module()
    module.layer_idx, module.is_causal, module.num_key_value_groups = 0, True, h // hkv

    k_rep, v_rep = key.repeat_interleave(h // hkv, 1), value.repeat_interleave(h // hkv, 1)
    w = query @ k_rep.transpose(-1, -2) * scaling  # [B, H, Q, K]
    last = w[:, :, -1]
    assert_close(last_row_logits(query, key, scaling), last, rel=1e-6)
    w[:, :, -1] = torch.where(image_keys[:, None], last * alpha[:, None, None], last)
    p = torch.softmax(w + mask, -1)
    expect = (p @ v_rep).transpose(1, 2)  # [B, Q, H, D]
    with Steerer(image_keys, [Intervention("scale", alpha)]) as s:
        out, _ = vislens_attention(module, query, key, value, mask, scaling=scaling)
    assert_close(s.records[0], p[:, :, -1], rel=1e-6)
    assert_close(out, expect, rel=1e-5)
    # a wrong head grouping (h % Hkv) would give other rows
    wrong = (query[:, :, -1:] @ key.repeat(1, h // hkv, 1, 1).transpose(-1, -2))[:, :, 0] * scaling
    assert (wrong - last).abs().max() > 0.1


def test_hooks_take_transformerlens_names_lists_and_filters(tiny_adapter):
    """Full names hit one layer, short names every layer; the hook gets a HookPoint."""
    adapter = tiny_adapter("llava")
    batch = adapter.prepare([random_image(15)], [QUESTION])
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, **batch.vision)
    seen: list[tuple[str, int, str]] = []

    def spy(t, hook):
        assert isinstance(hook, HookPoint) and hook.name == f"blocks.{hook.layer}.{hook.point}"
        seen.append((hook.name, hook.layer, hook.point))

    with torch.no_grad():
        with Steerer(batch.image_keys, record=False) as s:
            s.add_hook("blocks.1.attn.pattern", spy)
            s.add_hook(["blocks.0.attn.logits", "blocks.2.attn.logits"], spy)
            s.add_hook(lambda name: name.endswith("pattern") and name.startswith("blocks.2."), spy)
            s.add_hook("attn.logits", lambda t, hook: seen.append(("all", hook.layer, hook.point)))
            adapter.model(**kw)
        assert sorted(seen) == sorted([
            ("blocks.1.attn.pattern", 1, "attn.pattern"), ("blocks.0.attn.logits", 0, "attn.logits"),
            ("blocks.2.attn.logits", 2, "attn.logits"), ("blocks.2.attn.pattern", 2, "attn.pattern"),
            ("all", 0, "attn.logits"), ("all", 1, "attn.logits"), ("all", 2, "attn.logits")])
        # hooks are removed on exit: reusing the steerer runs none of them
        assert s.hooks == []
        seen.clear()
        with s:
            adapter.model(**kw)
        assert seen == []


def test_logit_hook_edits_one_layer_like_a_restricted_intervention(tiny_adapter):
    """A logits hook at blocks.1 scaling image keys equals scaling:alpha=2,layers=1, in both the
    new (tensor, hook) and the documented (layer, tensor, steerer) signatures."""
    adapter = tiny_adapter("llava")
    batch = adapter.prepare([random_image(16)], [QUESTION])
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, **batch.vision)
    keys = batch.image_keys

    def new_style(logits, hook):
        return torch.where(keys[:, None, :], logits * 2.0, logits)

    def old_style(layer, logits, steerer):
        assert isinstance(steerer, Steerer)
        return torch.where(steerer.image_keys[:, None, :], logits * 2.0, logits) if layer == 1 else None

    with torch.no_grad():
        with Steerer(keys, [Intervention("scale", torch.tensor([2.0]), layers=frozenset({1}))]) as ref:
            expect = adapter.model(**kw).logits[:, -1]
        for names, fn in (("blocks.1.attn.logits", new_style), ("attn.logits", old_style)):
            with Steerer(keys) as s:
                s.add_hook(names, fn)
                got = adapter.model(**kw).logits[:, -1]
            # a logits hook at every layer recomputes every answer row (other kernel than SDPA)
            assert_close(got, expect)
            for layer in ref.records:
                assert_close(s.records[layer], ref.records[layer])
        base = adapter.model(**kw).logits[:, -1]
    assert (expect - base).abs().max() > 1e-2 * base.abs().max()


def test_a_hook_with_an_optional_third_parameter_is_called_as_tensor_hook(tiny_adapter):
    """``fn(logits, hook, factor=2.0)`` is the (tensor, hook) form with an option, not the
    three-argument (layer, tensor, steerer) form: only required parameters decide."""
    adapter = tiny_adapter("llava")
    batch = adapter.prepare([random_image(16)], [QUESTION])
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, **batch.vision)
    keys = batch.image_keys
    rows: list[tuple[int, torch.Tensor]] = []

    def with_option(logits, hook, factor=2.0):
        return torch.where(keys[:, None, :], logits * factor, logits)

    def recorder(probs, hook, into=rows):
        into.append((hook.layer, probs))

    with torch.no_grad():
        with Steerer(keys, [Intervention("scale", torch.tensor([2.0]), layers=frozenset({1}))]) as ref:
            expect = adapter.model(**kw).logits[:, -1]
        with Steerer(keys) as s:
            s.add_hook("blocks.1.attn.logits", with_option)
            s.add_hook("attn.pattern", recorder)
            got = adapter.model(**kw).logits[:, -1]
    assert_close(got, expect)
    assert sorted(layer for layer, _ in rows) == sorted(ref.records)
    for layer, probs in rows:
        assert_close(probs, ref.records[layer])


def test_bad_hook_names_and_layers_outside_the_model_are_refused(tiny_adapter):
    adapter = tiny_adapter("llava")
    batch = adapter.prepare([random_image(17)], [QUESTION])
    s = Steerer(batch.image_keys)
    for bad in ("attn.scores", "blocks.x.attn.logits", "blocks.1.attn", []):
        with pytest.raises(ValueError, match="hook"):
            s.add_hook(bad, lambda t, hook: None)
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, **batch.vision)
    with torch.no_grad():
        with pytest.raises(VislensError, match=r"\[7\].*never ran.*0-2"):
            with Steerer(batch.image_keys) as s:
                s.add_hook("blocks.7.attn.pattern", lambda t, hook: None)
                adapter.model(**kw)
        with pytest.raises(VislensError, match="never ran"):
            with Steerer(batch.image_keys, [Intervention("scale", torch.tensor([2.0]),
                                                         layers=frozenset({5}))]):
                adapter.model(**kw)


@pytest.mark.parametrize("spec, msg", [
    ("scaling:alpha=2,layers=7", "layers=7 is outside the model (valid layers: 0-2)"),
    ("scaling:alpha=2,layers=1000000", "valid layers: 0-2"),
    ("add:delta=1,heads=99", "heads=99 is outside the model (valid heads: 0-3)"),
    ("knockout:heads=9", "valid heads: 0-3"),
    ("adaptvis:alpha1=0.5,alpha2=2,beta=0.5,layers=2-4", "layers=2-4 is outside"),
    ("dola:layers=0+3", "need indices in [0, 2]"),
])
def test_layers_and_heads_outside_the_model_are_refused_before_any_forward(tiny_adapter, spec, msg):
    """Issue 11 item 7: no silent no-op, no IndexError traceback, nothing run."""
    adapter = tiny_adapter("llava")
    engine = DecodingEngine(adapter, max_new_tokens=1)
    with pytest.raises(VislensError) as e:
        engine.run([random_image(18)], [QUESTION], [OPTIONS], [parse_condition(spec)])
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert engine.forward_calls == 0


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
    beta = midpoint_threshold(conf)
    spec = f"adaptvis:alpha1=0.5,alpha2=2,beta={beta!r}"
    engine = DecodingEngine(adapter, max_new_tokens=3)
    alone = engine.run(images, qs, [OPTIONS] * 3, [parse_condition(spec)])
    assert engine.forward_calls <= 1 + 1 + 3  # prefill, probe, one steered step + 2 continuation
    both = run_conditions(adapter, images, qs, [OPTIONS] * 3,
                          [spec, "scaling:alpha=0.5", "scaling:alpha=2"], max_new_tokens=3)
    assert {r["adaptvis"].alpha_used for r in alone} == {0.5, 2.0}
    for a, b in zip(alone, both):
        # per-row values in one forward do the same arithmetic per row as one value per forward
        assert a["adaptvis"].text == b["adaptvis"].text
        assert a["adaptvis"].confidence == pytest.approx(b["adaptvis"].confidence, rel=1e-5)
        assert_close(a["adaptvis"].image_attention, b["adaptvis"].image_attention)


def forced_scores(adapter, engine, batch, key, tokens):
    """Next-token scores along given continuations (teacher forcing), each setting run alone:
    the steered last prompt token, then unsteered decode steps feeding ``tokens`` [B, T]."""
    from vislens.steering import interventions_for

    cache = engine.prefill(batch)
    values = list(key.value) if isinstance(key.value, tuple) else [key.value] * batch.size
    with torch.no_grad():
        with Steerer(batch.image_keys, interventions_for(key.kind, values, layers=key.layers,
                                                         heads=key.heads), record=False):
            out = adapter.model(**engine._last(batch), **{engine._cache_kw: cache})
        scores, mask = [out.logits[:, -1].float()], batch.attention_mask
        for t in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            feed = tokens[:, t].clamp_min(0)[:, None]  # finished rows feed anything
            out = adapter.model(input_ids=feed, attention_mask=mask, use_cache=True,
                                position_ids=adapter.next_position(batch.position_ids, t),
                                **{engine._cache_kw: cache})
            scores.append(out.logits[:, -1].float())
    return torch.stack(scores, 1)  # [B, T, V]


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_fused_settings_equal_one_pass_per_setting(tiny_adapter, arch):
    """K settings as one B x K batch over the repeated cache: the same answers and attention
    as one pass per setting, in fewer forward calls."""
    from vislens.conditions import plan_conditions

    adapter = tiny_adapter(arch)
    images = [random_image(30, (60, 40)), random_image(31, (44, 52))]
    qs = [QUESTION, SHORT]
    specs = ["baseline", "scaling:alpha=0.5", "scaling:alpha=2", "add:delta=-1,layers=1",
             "knockout:heads=1", "adaptvis:alpha1=0.5,alpha2=2,beta=0.5"]
    conds = [parse_condition(c) for c in specs]
    fused, alone = DecodingEngine(adapter, max_new_tokens=4), DecodingEngine(adapter, max_new_tokens=4,
                                                                             max_fused_rows=1)
    got, ref = fused.run(images, qs, [OPTIONS] * 2, conds), alone.run(images, qs, [OPTIONS] * 2, conds)
    # prefill + baseline (AdaptVis's probe, also a condition) + the other four settings
    # together: 1 + 4 + 4 calls at most, against 1 + 5 x 4 one setting at a time
    assert fused.forward_calls <= 1 + 4 + 4 < alone.forward_calls
    for g, r in zip(got, ref):
        for c in conds:
            assert g[c.name].alpha_used == r[c.name].alpha_used or math.isnan(r[c.name].alpha_used)
            assert g[c.name].confidence == pytest.approx(r[c.name].confidence, rel=1e-5)
            assert_close(g[c.name].option_probs, r[c.name].option_probs)
            assert_close(g[c.name].image_mass, r[c.name].image_mass)
            assert_close(g[c.name].image_attention, r[c.name].image_attention)
    # contrastive rules run on the prefix cache the fused pass hands back
    extra = conds[:3] + [parse_condition("vcd"), parse_condition("dola")]
    got = fused.run(images, qs, [OPTIONS] * 2, extra, sample_keys=["a", "b"])
    ref = alone.run(images, qs, [OPTIONS] * 2, extra, sample_keys=["a", "b"])
    for g, r in zip(got, ref):
        for c in ("vcd", "dola"):
            assert g[c].confidence == pytest.approx(r[c].confidence, rel=1e-5)
            assert_close(g[c].image_mass, r[c].image_mass)
    # the fused continuations are greedy under the one-setting-per-pass kernels: every token
    # is the argmax of the separately computed scores, up to float rounding (near-ties may go
    # either way)
    batch = adapter.prepare(images, qs)
    with torch.no_grad():
        cache = fused.prefill(batch)
        keys = list(dict.fromkeys(k for p in plan_conditions(conds[:-1], 2, None).values()
                                  for k in p.rows))
        steps = fused.fused_steps(batch, cache, keys, generate=True)
    for key, st in steps.items():
        tokens = torch.tensor(st.tokens)
        scores = forced_scores(adapter, alone, batch, key, tokens)
        for i in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                if tokens[i, t] < 0:
                    break
                s = scores[i, t]
                assert s[tokens[i, t]] >= s.max() - 1e-4 * s.abs().max(), (key, i, t)


@pytest.fixture(scope="module")
def sliding_adapter(tiny_dir, tmp_path_factory):
    """The tiny Qwen2-VL with a 16-token sliding window on layers 1-2 (layer 0 full)."""
    import json
    import shutil

    from vislens.models import load_model

    dest = tmp_path_factory.mktemp("sliding") / "qwen2_vl"
    shutil.copytree(tiny_dir("qwen2_vl"), dest)
    cfg = json.loads((dest / "config.json").read_text())
    text = cfg["text_config"]
    text.update(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    text.pop("layer_types", None)
    (dest / "config.json").write_text(json.dumps(cfg))
    return load_model(dest, dtype="float32", device="cpu")


@pytest.mark.parametrize("kind", ["scale", "knockout"])
def test_sliding_window_layers_match_eager_reference_on_the_prefix_cache(sliding_adapter, kind):
    """A sliding-window layer's cache keeps only the window: the steered last row on the
    prefix cache equals the eager full-matrix reference (sliding mask), its recorded row
    covers every key (zero outside the window) and the window really hides image keys."""
    from eager_reference import knockout_edit

    adapter = sliding_adapter
    assert adapter.model.config.text_config.layer_types[1:] == ["sliding_attention"] * 2
    batch = adapter.prepare([random_image(1, (60, 40)), random_image(2, (44, 52))], [QUESTION, SHORT])
    n_keys = batch.input_ids.shape[1]
    outside = batch.image_keys[:, :n_keys - 16]
    assert bool(outside.any(-1).all()), "the window must hide image keys of every row"
    alpha = [0.5, 2.0]
    edit = alpha if kind == "scale" else knockout_edit()
    ref_logits, ref_rows = reference_forward(adapter, batch, edit)
    key = SettingKey("scale", tuple(alpha)) if kind == "scale" else SettingKey("knockout", 0.0)
    st = engine_step(adapter, batch, key)
    assert_close(st.logits, ref_logits)
    valid = batch.attention_mask.bool()
    for layer, row in ref_rows.items():
        assert st.rows[layer].shape == row.shape
        for i in range(2):
            assert_close(st.rows[layer][i][:, valid[i]], row[i][:, valid[i]])
    assert bool((st.rows[2][:, :, :n_keys - 16] == 0).all())
    base = engine_step(adapter, batch, BASELINE_KEY)
    assert (st.logits - base.logits).abs().max() > 1e-2 * base.logits.abs().max()
    # settings share one prefix cache: a generating step is cropped back to the prefix
    engine = DecodingEngine(adapter, max_new_tokens=4)
    with torch.no_grad():
        cache = engine.prefill(batch)
        engine.step(batch, cache, BASELINE_KEY, generate=True)
        again = engine.step(batch, cache, key)
    assert_close(again.logits, ref_logits)


def test_sliding_window_logit_stats_cover_the_image_keys_in_the_window(sliding_adapter):
    """Image-key logit statistics of a sliding layer are over the image keys its window
    shows, the same on a full prefill and on the prefix cache (eager reference logits)."""
    from vislens.steering import image_logit_stats

    adapter = sliding_adapter
    batch = adapter.prepare([random_image(1, (60, 40)), random_image(2, (44, 52))], [QUESTION, SHORT])
    alpha = torch.tensor([0.5, 2.0])
    ref = {}
    reference_forward(adapter, batch, alpha.tolist(), logits=ref)
    n_keys = batch.input_ids.shape[1]
    with torch.no_grad(), Steerer(batch.image_keys, [Intervention("scale", alpha)]) as full:
        adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, **batch.vision)
    engine = DecodingEngine(adapter, max_new_tokens=1)
    with torch.no_grad():
        cache = engine.prefill(batch)
        with Steerer(batch.image_keys, [Intervention("scale", alpha)]) as last:
            adapter.model(**engine._last(batch), **{engine._cache_kw: cache})
    for layer, logits in ref.items():
        keys = batch.image_keys.clone()
        if layer > 0:  # sliding layers: the last 16 keys
            keys[:, :n_keys - 16] = False
        if layer > 0:  # row 1's window holds image keys, and so do the keys before it
            assert bool(keys[1].any()) and bool(batch.image_keys[1, :n_keys - 16].any())
        want = image_logit_stats(logits.float(), keys)
        for got in (full.logit_stats[layer], last.logit_stats[layer]):
            for g, w in zip(got, want):  # NaN: a row without image keys in its window
                assert torch.equal(g.isnan(), w.isnan())
                assert_close(g[~w.isnan()], w[~w.isnan()])


@pytest.mark.parametrize("field", ["layers", "heads"])
def test_an_intervention_on_no_layer_or_head_is_refused(field):
    """An empty selection would steer nothing; it is refused in one line (VislensError, the
    CLI's one-line error), not a silent no-op nor a max() of an empty list later."""
    with pytest.raises(VislensError, match=rf"scale: {field} is empty"):
        Intervention("scale", torch.tensor([2.0]), **{field: frozenset() if field == "layers" else ()})
