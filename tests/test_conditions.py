"""Conditions as plain data: parsing, declared parameters, validation, plans, names, labels.

No model and no torch here: vislens.conditions is the torch-free half of decoding.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from vislens.conditions import (BASELINE_KEY, METHODS, Condition, Plan, SettingKey,
                                check_conditions, condition_help, condition_label,
                                parse_condition, plan_conditions)
from vislens.errors import VislensError

SPECS = ["baseline", "scaling:alpha=0.5", "scaling:alpha=2,layers=8-15+20,heads=0+3",
         "adaptvis:alpha1=0.5,alpha2=2,beta=0.3", "add:delta=-1,layers=2", "knockout",
         "knockout:layers=1-2,heads=3,name=ko", "vcd", "vcd:alpha=0.5,seed=3,name=vcd2",
         "dola:layers=0+2,name=dola2", "dola"]


def test_import_is_torch_free():
    code = "import sys, vislens.conditions, vislens.plots; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips_and_attrs_hold_every_parameter(spec):
    cond = parse_condition(spec)
    again = parse_condition(cond.spec())  # the spec leaves out the name
    assert again == dataclasses.replace(cond, name=again.name)
    attrs = cond.attrs()
    assert attrs["method"] == cond.method and attrs["spec"] == cond.spec()
    for p in METHODS.get(cond.method).params:
        assert attrs[p.name] == cond[p.name]


def test_declared_defaults_and_names():
    assert parse_condition("scaling:alpha=0.5").name == "scaling-0.5"
    assert parse_condition("add:delta=1").name == "add+1"
    assert parse_condition("add:delta=-0.5").name == "add-0.5"
    assert parse_condition("knockout:layers=3").name == "knockout"
    assert parse_condition("scaling:alpha=2,name=sharp").name == "sharp"
    vcd = parse_condition("vcd:beta=0.2")
    assert (vcd["alpha"], vcd["beta"], vcd["noise_steps"], vcd["seed"]) == (1.0, 0.2, 500.0, 0.0)
    scaling = parse_condition("scaling:alpha=2,layers=3-5+9,heads=1")
    assert scaling.layers == (3, 4, 5, 9) and scaling.heads == (1,)


def test_dola_layers_is_its_premature_layers_not_a_steering_restriction():
    d = parse_condition("dola:layers=high")  # the documented CLI spelling still works
    assert d["premature_layers"] == "high" and d.layers is None
    assert d == parse_condition("dola:premature_layers=high")
    assert d.attrs()["premature_layers"] == "high" and "layers" not in d.attrs()
    with pytest.raises(VislensError, match="premature_layers"):
        check_conditions([parse_condition("dola:layers=0+5")], num_layers=4)


@pytest.mark.parametrize("spec, layers, heads, msg", [
    ("scaling:alpha=2,layers=7", 4, 8, "layers=7 is outside the model (valid layers: 0-3)"),
    ("scaling:alpha=2,layers=1000000", 4, 8, "valid layers: 0-3"),
    ("add:delta=1,heads=99", 4, 8, "heads=99 is outside the model (valid heads: 0-7)"),
    ("scaling:alpha=2,heads=9", 4, 8, "valid heads: 0-7"),
    ("knockout:layers=2-4", 4, 8, "layers=2-4 is outside"),
    ("adaptvis:alpha1=0.5,alpha2=2,beta=0.5,heads=8", 4, 8, "valid heads: 0-7"),
    ("dola:layers=4", 4, 8, "need indices in [0, 3]"),
])
def test_restrictions_outside_the_model_are_one_line_errors(spec, layers, heads, msg):
    cond = parse_condition(spec)  # without counts nothing is known about the model
    with pytest.raises(VislensError) as e:
        check_conditions([cond], num_layers=layers, num_heads=heads)
    assert msg in str(e.value) and "\n" not in str(e.value)
    check_conditions([cond])  # counts unknown: accepted


def test_restrictions_inside_the_model_pass():
    check_conditions([parse_condition(s) for s in SPECS if "15" not in s and "20" not in s],
                     num_layers=4, num_heads=4)


@pytest.mark.parametrize("spec, msg", [
    ("scaling:alpha=2,layers=5-2", "selects nothing"), ("scaling:alpha=2,layers=", "selects nothing"),
    ("knockout:heads=x", "expected integers"), ("baseline:layers=1", "unknown option 'layers'"),
    ("vcd:heads=0", "unknown option 'heads'"), ("dola:heads=0", "unknown option 'heads'"),
    ("scaling:alpha=1,alpha=2", "given twice"), ("scaling:alpha", "expected key=value"),
    ("adaptvis:alpha1=2,alpha2=0.5,beta=0.3", "alpha1 <= alpha2"),
    ("vcd:noise_steps=2.5", "integer"), ("vcd:beta=0", "(0, 1]"), ("scaling:alpha=-1", "> 0"),
    ("vcd:noise_steps=0", "noise_steps=0 must be an integer in [1, 999]"),
    ("vcd:noise_steps=-3", "noise_steps=-3 must be an integer in [1, 999]"),
    ("vcd:alpha=-0.5", "alpha=-0.5 must be >= 0"), ("vcd:beta=1.5", "beta=1.5 must be in (0, 1]"),
    ("adaptvis:alpha1=0,alpha2=2,beta=0.5", "alpha1=0 must be > 0"),
    ("adaptvis:alpha1=0.5,alpha2=2,beta=1.2", "beta=1.2 must be in [0, 1]"),
    ("scaling:alpha=0", "alpha=0 must be > 0"), ("dola:relative_top=0", "relative_top=0 must be in (0, 1)"),
    ("knockout:name=a/b", "without '/'"), ("knockout:layers=0-99999999", "spans more than"),
    ("knockout:layers=3-", "expected integers"), ("knockout:layers=-1", "expected integers"), ("warp", "unknown condition method 'warp'"),
])
def test_bad_specs_are_one_line_errors(spec, msg):
    with pytest.raises(VislensError) as e:
        parse_condition(spec)
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, part", [("scaling:alpha=2,layers=5-2+7", "'5-2'"),
                                        ("knockout:heads=0+3-1", "'3-1'"),
                                        ("dola:layers=4-2+1", "'4-2'")])
def test_a_reversed_range_inside_a_list_is_refused_not_dropped(spec, part):
    """``layers=5-2+7`` is not layer 7 alone: a reversed part selects nothing and is an error
    like ``layers=5-2`` on its own, wherever it stands in the list."""
    with pytest.raises(VislensError) as e:
        parse_condition(spec)
    assert f"{part} selects nothing" in str(e.value)
    assert "\n" not in str(e.value)


def test_directly_built_conditions_are_validated_too():
    with pytest.raises(VislensError, match="missing alpha"):
        check_conditions([Condition("s", "scaling")])
    with pytest.raises(VislensError, match="not finite"):
        check_conditions([Condition("s", "scaling", (("alpha", math.nan),))])
    with pytest.raises(VislensError, match="unknown option 'gamma'"):
        check_conditions([Condition("s", "scaling", (("alpha", 2.0), ("gamma", 1.0)))])
    with pytest.raises(VislensError, match="takes no layers"):
        check_conditions([Condition("b", "baseline", layers=(1,))])
    with pytest.raises(VislensError, match="named 'a'"):
        check_conditions([Condition("a", "baseline"), Condition("a", "knockout")])
    with pytest.raises(VislensError, match="no condition"):
        check_conditions([])


def test_help_and_labels_come_from_the_registry():
    text = condition_help()
    for name in METHODS:
        assert name in text
    assert "alpha1=ALPHA1" in text and "noise_steps=500" in text
    labels = {s: condition_label(parse_condition(s).name, parse_condition(s).attrs()) for s in SPECS}
    assert labels["scaling:alpha=0.5"] == "ScalingVis α=0.5"
    assert labels["scaling:alpha=2,layers=8-15+20,heads=0+3"] == "ScalingVis α=2, layers 8-15+20, heads 0+3"
    assert labels["adaptvis:alpha1=0.5,alpha2=2,beta=0.3"] == "AdaptVis (α₁=0.5, α₂=2, β=0.3)"
    assert labels["add:delta=-1,layers=2"] == "add δ=-1, layers 2"
    assert labels["knockout:layers=1-2,heads=3,name=ko"] == "image knockout, layers 1-2, heads 3"
    assert labels["baseline"] == "baseline" and labels["vcd"] == "VCD" and labels["dola"] == "DoLa"
    # attrs that lack a method's parameters, or unknown methods, fall back to the name
    assert condition_label("mine", {"method": "scaling"}) == "mine"
    assert condition_label("other", {"method": "warp"}) == "other"


def test_setting_key_is_a_named_tuple():
    key = parse_condition("scaling:alpha=2,layers=1")
    plan = plan_conditions([key], 3, _no_confidence)["scaling-2"]
    assert plan.rows[0] == SettingKey("scale", 2.0, (1,), None)
    assert plan.rows[0].kind == "scale" and plan.rows[0].layers == (1,) and plan.rows[0].rule == "greedy"
    assert BASELINE_KEY == SettingKey("scale", 1.0)


def _no_confidence():
    raise AssertionError("no method here needs the baseline confidence")


def test_plans_alpha_used_and_identity_settings():
    conds = [parse_condition(s) for s in ("baseline", "scaling:alpha=1,name=s1", "scaling:alpha=0.5",
                                          "add:delta=0,name=a0", "add:delta=1", "knockout",
                                          "vcd", "dola")]
    plans = plan_conditions(conds, 2, _no_confidence)
    assert plans["baseline"] == Plan((BASELINE_KEY,) * 2, (1.0, 1.0))
    assert plans["s1"].rows == (BASELINE_KEY,) * 2  # alpha 1 is the baseline forward
    assert plans["a0"].rows == (BASELINE_KEY,) * 2  # adding 0 too
    assert plans["scaling-0.5"].alpha_used == (0.5, 0.5)
    for name in ("a0", "add+1", "knockout", "vcd", "dola"):  # no temperature applies
        assert all(math.isnan(a) for a in plans[name].alpha_used)
    assert plans["knockout"].rows[0].kind == "knockout"
    assert plans["vcd"].rows[0].rule == "vcd" and plans["dola"].rows[0].rule == "dola"
    assert dict(plans["dola"].rows[0].rule_args)["premature_layers"] == "high"


class Probe:
    """Stands in for the engine's unsteered step: returns fixed confidences, counts calls."""

    def __init__(self, conf):
        self.conf, self.calls = np.asarray(conf), 0

    def __call__(self):
        self.calls += 1
        return self.conf


def test_adaptvis_plans_each_row_from_the_confidence():
    conf = [0.2, 0.7, 0.31, 0.9]
    ada = parse_condition("adaptvis:alpha1=0.5,alpha2=2,beta=0.3")
    probe = Probe(conf)
    plans = plan_conditions([ada], 4, probe)
    assert probe.calls == 1
    # alone: one forward in which every row gets its own alpha
    assert plans["adaptvis"].rows == (SettingKey("scale", (0.5, 2.0, 2.0, 2.0)),) * 4
    assert plans["adaptvis"].alpha_used == (0.5, 2.0, 2.0, 2.0)
    # with the scaling conditions planned anyway, each row reuses theirs
    probe = Probe(conf)
    plans = plan_conditions([parse_condition(s) for s in ("baseline", "scaling:alpha=0.5",
                                                          "scaling:alpha=2")] + [ada], 4, probe)
    assert probe.calls == 1
    assert plans["adaptvis"].rows == (SettingKey("scale", 0.5), SettingKey("scale", 2.0),
                                      SettingKey("scale", 2.0), SettingKey("scale", 2.0))
    # every row on one side: that one setting, shared with scaling-2
    plans = plan_conditions([ada, parse_condition("scaling:alpha=2")], 2, Probe([0.5, 0.6]))
    assert plans["adaptvis"].rows == plans["scaling-2"].rows


def test_no_probe_without_adaptive_methods():
    plan_conditions([parse_condition(s) for s in SPECS if not s.startswith("adaptvis")], 2,
                    _no_confidence)
