"""VCD and DoLa conditions against plain, cache-free implementations of their formulas."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from conftest import random_image
from eager_reference import assert_close, reference_forward
from vislens.conditions import METHODS
from vislens.decoding import BASELINE_KEY, RULES, DecodingEngine, dola_candidates, parse_condition

Q = "Where is the ball in relation to the box? Answer with left, right, on or under."
OPTS = ["Left", "Right", "On", "Under"]


def plain_noise(pix, steps, key, seed=0):
    """Forward diffusion with VCD's sigmoid schedule, written out step by step."""
    betas = [1e-5 + (5e-3 - 1e-5) / (1 + math.exp(-x)) for x in np.linspace(-6, 6, 1000)]
    abar = 1.0
    for t in range(steps + 1):
        abar *= 1 - betas[t]
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    eps = torch.randn(pix.shape, generator=g)
    return math.sqrt(abar) * pix + math.sqrt(1 - abar) * eps


def full_logits(model, ids, vision):
    extra = {}
    if "image_grid_thw" in vision:  # Qwen2-VL computes its own M-RoPE from token types
        extra["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision, **extra).logits[:, -1].float()


def plain_greedy(score_fn, ids, steps, eos, tie=1e-3):
    """Greedy tokens, cut before the first near-tie (top-2 scores closer than ``tie`` times the
    largest finite score): a different kernel may break such a tie either way."""
    out = []
    for _ in range(steps):
        scores = score_fn(ids)[0]
        finite = scores[torch.isfinite(scores)]
        top = torch.topk(finite, min(2, finite.numel())).values
        if top.numel() == 2 and top[0] - top[1] <= tie * finite.abs().max():
            break
        tok = int(scores.argmax(-1))
        out.append(tok)
        if tok in eos:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    assert out, "fixture has a near-tie at the first token: pick another image"
    return out


def engine_tokens(engine, batch, spec, sample_keys):
    """Token ids of the condition's decoding rule, run directly on the prefix cache."""
    cond = parse_condition(spec)
    key = METHODS.get(cond.method).plan(cond, 1, None).rows[0]
    with torch.no_grad():
        st = RULES.get(key.rule)(engine, batch, engine.prefill(batch), key, generate=True,
                                 record=False, sample_keys=sample_keys)
    return [t for t in st.tokens[0] if t >= 0], st


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_vcd_matches_plain_formula(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    img = random_image(0, (48, 48))
    batch = adapter.prepare([img], [Q])
    noisy = {**batch.vision, "pixel_values": plain_noise(batch.vision["pixel_values"], 500, "s1")}
    a, b = 1.0, 0.1

    def score(ids):
        real, fake = full_logits(adapter.model, ids, batch.vision), full_logits(adapter.model, ids, noisy)
        s = (1 + a) * real - a * fake
        keep = torch.softmax(real, -1) >= b * torch.softmax(real, -1).max()
        return torch.where(keep, s, torch.tensor(float("-inf")))

    first = score(batch.input_ids)
    expect = plain_greedy(score, batch.input_ids, 4, adapter.eos_token_ids)
    engine = DecodingEngine(adapter, max_new_tokens=4)
    spec = "vcd:alpha=1,beta=0.1,noise_steps=500"
    res = engine.run([img], [Q], [OPTS], [parse_condition(spec)], sample_keys=["s1"])[0]["vcd"]
    probs = torch.softmax(first, -1)[0]
    assert res.confidence == pytest.approx(float(probs.max()), rel=1e-4)
    assert res.first_token == expect[0]
    tokens, _ = engine_tokens(engine, batch, spec, ["s1"])
    assert tokens[:len(expect)] == expect[:len(tokens)]
    assert res.text == adapter.tokenizer.decode([t for t in tokens if t not in adapter.eos_token_ids],
                                                skip_special_tokens=True).strip()
    # the noise is deterministic per sample key
    res2 = engine.run([img], [Q], [OPTS], [parse_condition("vcd")], sample_keys=["s1"])[0]["vcd"]
    res3 = engine.run([img], [Q], [OPTS], [parse_condition("vcd")], sample_keys=["other"])[0]["vcd"]
    assert res2.confidence == res.confidence and res3.confidence != res.confidence


def test_dola_matches_plain_formula(tiny_dir):
    from vislens.models import load_model

    adapter = load_model(tiny_dir("llava"), dtype="float32", device="cpu")
    img = random_image(1, (48, 48))
    batch = adapter.prepare([img], [Q])
    model = adapter.model
    cands = dola_candidates("high", adapter.num_layers)
    norm = model.model.language_model.norm
    assert cands == [1]  # 3 layers: upper half, every second layer

    def score(ids, candidates=(0, 1)):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                        **batch.vision)
        final = torch.log_softmax(out.logits[0, -1].float(), -1)
        best, best_j = -1.0, None
        for j in candidates:
            with torch.no_grad():
                prem = torch.log_softmax(model.lm_head(norm(out.hidden_states[j][0, -1])).float(), -1)
            d = jensenshannon(final.exp().numpy(), prem.exp().numpy()) ** 2
            if d > best:
                best, best_j = d, prem
        s = final - best_j
        return torch.where(final >= math.log(0.1) + final.max(), s, torch.tensor(float("-inf")))[None]

    expect = plain_greedy(score, batch.input_ids, 3, adapter.eos_token_ids)
    engine = DecodingEngine(adapter, max_new_tokens=3)
    spec = "dola:layers=0+1,name=d"  # the CLI spelling of premature_layers
    res = engine.run([img], [Q], [OPTS], [parse_condition(spec)])[0]["d"]
    assert res.first_token == expect[0]
    assert res.confidence == pytest.approx(float(torch.softmax(score(batch.input_ids), -1).max()), rel=1e-4)
    assert math.isnan(res.alpha_used)
    tokens, _ = engine_tokens(engine, batch, spec, [Q])
    assert tokens[:len(expect)] == expect[:len(tokens)]
    assert res.text == adapter.tokenizer.decode(
        [t for t in tokens if t not in adapter.eos_token_ids], skip_special_tokens=True).strip()


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_baselines_record_the_unsteered_attention(tiny_adapter, arch):
    """VCD and DoLa record the real image's answer row (their own forward, not the noisy view
    nor a borrowed baseline step): equal to the unsteered eager reference."""
    adapter = tiny_adapter(arch)
    img = random_image(2, (48, 48))
    batch = adapter.prepare([img], [Q])
    _, rows = reference_forward(adapter, batch, None)
    engine = DecodingEngine(adapter, max_new_tokens=2)
    res = engine.run([img], [Q], [OPTS], [parse_condition(c) for c in ("vcd", "dola")])[0]
    keys = batch.image_keys[0]
    valid = batch.attention_mask[0].bool()
    for name in ("vcd", "dola"):
        r = res[name]
        assert math.isnan(r.alpha_used)
        for layer, row in rows.items():
            assert_close(r.image_mass[layer], row[0][:, keys].sum(-1).numpy())
            assert_close(r.text_mass[layer], row[0][:, valid & ~keys].sum(-1).numpy())
        assert_close(r.image_attention.sum((-1, -2)), r.image_mass, rel=1e-5)
    # VCD's noisy view (same noise as the run) attends differently: recording it instead
    # would fail the checks above
    noisy = {**batch.vision, "pixel_values": plain_noise(batch.vision["pixel_values"], 500, Q)}
    nb = type(batch)(**{**batch.__dict__, "vision": noisy})
    with torch.no_grad():
        noisy_mass = engine.step(nb, engine.prefill(nb), BASELINE_KEY).image_mass[0]
    assert np.abs(noisy_mass - res["vcd"].image_mass).max() > 1e-3


def test_dola_candidates():
    assert dola_candidates("low", 32) == list(range(0, 16, 2))
    assert dola_candidates("high", 32) == list(range(16, 32, 2))
    assert dola_candidates("high", 60) == list(range(40, 60, 2))
    assert dola_candidates("3+5", 32) == [3, 5]
    # tied LM head and embeddings (Qwen2-VL-2B, 28 layers): "low" skips the embeddings' exit
    # and starts at layer 2, as transformers 4.x does; "high" and lists are unchanged
    assert dola_candidates("low", 28, tied_embeddings=True) == [2, 4, 6, 8, 10, 12]
    assert dola_candidates("low", 60, tied_embeddings=True) == list(range(2, 20, 2))
    assert dola_candidates("low", 2, tied_embeddings=True) == [1]
    assert dola_candidates("high", 28, tied_embeddings=True) == dola_candidates("high", 28)
    assert dola_candidates("0+2", 28, tied_embeddings=True) == [0, 2]
    from vislens.errors import VislensError

    with pytest.raises(VislensError, match="layers"):
        dola_candidates("40", 32)


@pytest.mark.parametrize("spec, msg", [("vcd:beta=0", "beta"), ("vcd:noise_steps=1000", "noise_steps"),
                                       ("vcd:alpha=-1", "alpha"), ("dola:relative_top=1", "relative_top"),
                                       ("dola:layers=x", "layers")])
def test_bad_baseline_options(spec, msg):
    from vislens.errors import VislensError

    with pytest.raises(VislensError, match=msg):
        parse_condition(spec)


def test_the_accepted_noise_steps_are_the_schedule():
    """``noise_steps`` 1 and 999, the ends of the accepted range, index VCD's 1000-step
    schedule as the step-by-step reference does; 0 (no noise: nothing to contrast) is refused."""
    from vislens.decoding import diffusion_noise
    from vislens.errors import VislensError

    pix = torch.linspace(-1, 1, 24).reshape(2, 3, 2, 2)
    for steps in (1, 999):
        cond = parse_condition(f"vcd:noise_steps={steps}")
        digest = hashlib.sha256(b"0:k").digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        got = diffusion_noise(pix, int(cond["noise_steps"]), gen)
        torch.testing.assert_close(got, plain_noise(pix, steps, "k").float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(VislensError, match=r"^condition vcd: noise_steps=0 must be an integer in \[1, 999\]"):
        parse_condition("vcd:noise_steps=0")


def test_tied_embeddings_read_from_the_weights(tiny_dir):
    from vislens.models import load_model

    adapter = load_model(tiny_dir("llava"), dtype="float32", device="cpu")
    head, emb = adapter.model.get_output_embeddings(), adapter.model.get_input_embeddings()
    assert adapter.tied_embeddings == (head.weight is emb.weight)
    head.weight = emb.weight  # tie them, as a tied checkpoint loads
    assert adapter.tied_embeddings
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    assert not adapter.tied_embeddings


def test_sample_keys_must_be_one_per_sample(tiny_adapter):
    """VCD seeds each sample's noise with its key: a key list of another length would seed
    samples with other samples' keys, or leave pixels out (a traceback deep in the model)."""
    from vislens.errors import VislensError

    adapter = tiny_adapter("llava")
    engine = DecodingEngine(adapter, max_new_tokens=1)
    images, qs = [random_image(3), random_image(4)], [Q, Q]
    for keys in (["a"], ["a", "b", "c"]):
        with pytest.raises(VislensError, match="3 sample keys|1 sample key") as e:
            engine.run(images, qs, [OPTS] * 2, [parse_condition("vcd")], sample_keys=keys)
        assert "\n" not in str(e.value)
    ok = engine.run(images, qs, [OPTS] * 2, [parse_condition("vcd")], sample_keys=["a", "b"])
    assert len(ok) == 2
