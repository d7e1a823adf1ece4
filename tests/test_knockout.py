"""Attention knockout (image keys of the answer row get -inf) against the eager reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import random_image
from eager_reference import assert_close, knockout_edit, reference_forward
from vislens.conditions import plan_conditions
from vislens.decoding import DecodingEngine, parse_condition, run_conditions

QUESTION = "Where is the ball in relation to the box? Answer with left, right, on or under."
OPTIONS = ["Left", "Right", "On", "Under"]


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("layers, heads", [((1,), (0, 2)), ((1, 2), None), (None, None)])
def test_knockout_matches_eager_reference(tiny_adapter, arch, layers, heads):
    adapter = tiny_adapter(arch)
    image = random_image(20, (48, 48))
    batch = adapter.prepare([image], [QUESTION])
    spec = "knockout:" + ",".join([f"{k}={'+'.join(map(str, v))}" for k, v in
                                   (("layers", layers), ("heads", heads)) if v] + ["name=ko"])
    ref_logits, ref_rows = reference_forward(adapter, batch, knockout_edit(layers, heads))
    _, base_rows = reference_forward(adapter, batch, None)

    engine = DecodingEngine(adapter, max_new_tokens=1)
    res = engine.run([image], [QUESTION], [OPTIONS], [parse_condition("baseline"),
                                                      parse_condition(spec)])[0]
    ko, base = res["ko"], res["baseline"]
    img = batch.image_keys[0]
    knocked_layers = range(adapter.num_layers) if layers is None else layers
    knocked_heads = list(range(adapter.num_heads)) if heads is None else list(heads)
    other_heads = [h for h in range(adapter.num_heads) if h not in knocked_heads]
    first = min(knocked_layers)
    assert math.isnan(ko.alpha_used)
    for layer in range(adapter.num_layers):
        ref_mass = ref_rows[layer][0][:, img].sum(-1).numpy()
        if layer in knocked_layers:
            # exactly zero: -inf logits give exp(-inf) = 0, in vislens and in the reference
            assert (ko.image_mass[layer][knocked_heads] == 0).all()
            assert (ref_mass[knocked_heads] == 0).all()
            assert (ko.image_attention[layer][knocked_heads] == 0).all()
            assert_close(ko.text_mass[layer][knocked_heads], np.ones(len(knocked_heads)), rel=1e-5)
        assert_close(ko.image_mass[layer], ref_mass)
        if layer < first:
            # before the first knocked-out layer the inputs are the baseline's: same rows
            np.testing.assert_array_equal(ko.image_mass[layer], base.image_mass[layer])
            np.testing.assert_array_equal(ko.image_attention[layer], base.image_attention[layer])
            assert_close(ko.image_mass[layer], base_rows[layer][0][:, img].sum(-1).numpy())
    if other_heads:  # at the first knocked layer, the other heads still read the baseline input
        np.testing.assert_array_equal(ko.image_mass[first][other_heads], base.image_mass[first][other_heads])
    # and the knockout moved the answer well beyond the tolerance
    step = engine.step(batch, engine.prefill(batch), parse_key(spec), keep_rows=True)
    assert_close(step.logits, ref_logits)
    base_logits = reference_forward(adapter, batch, None)[0]
    assert (ref_logits - base_logits).abs().max() > 1e-2 * base_logits.abs().max()


def parse_key(spec: str):
    """The steering setting the condition plans for a one-row batch."""
    cond = parse_condition(spec)
    return plan_conditions([cond], 1, lambda: None)[cond.name].rows[0]


def test_knockout_in_a_padded_batch_zeroes_only_image_keys(tiny_adapter):
    adapter = tiny_adapter("llava")
    images = [random_image(21, (60, 40)), random_image(22, (44, 52))]
    qs = [QUESTION, "Where is the box?"]
    res = run_conditions(adapter, images, qs, [OPTIONS] * 2, ["knockout:layers=2"], max_new_tokens=2)
    for r in res:
        assert (r["knockout"].image_mass[2] == 0).all() and (r["knockout"].image_mass[:2] > 0).all()
        assert_close(r["knockout"].text_mass[2], np.ones(adapter.num_heads), rel=1e-5)


def test_knockout_refuses_layers_outside_the_model(tiny_adapter):
    from vislens.errors import VislensError

    with pytest.raises(VislensError, match="valid layers: 0-2"):
        run_conditions(tiny_adapter("llava"), [random_image(23)], [QUESTION], [OPTIONS],
                       ["knockout:layers=3"], max_new_tokens=1)
    with pytest.raises(VislensError, match="selects nothing"):
        parse_condition("knockout:layers=2-1")
