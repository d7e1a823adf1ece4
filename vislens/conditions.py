"""Decoding conditions as plain data: parsing, validation, planning, names. Torch-free.

A condition (``scaling:alpha=0.5``, ``adaptvis:alpha1=0.5,alpha2=2,beta=0.3``, ...) is a
:class:`Condition`: its method, numeric parameters, string options and an optional
restriction of the steering to some layers/heads. Each method is one :class:`Method`
subclass in the :data:`METHODS` registry that

* declares its parameters (:class:`Param`: name, type, default, range; the parser, the
  validation and the ``--condition`` help are built from them),
* validates a condition, also against a model's layer and head counts,
* plans, per batch row, which steering setting (:class:`SettingKey`) gives its result and
  which temperature that applies (from the unsteered confidence where it needs one),
* names (default condition name) and labels (plots) itself.

:class:`~vislens.decoding.DecodingEngine` executes the planned settings; it knows no
method. Adding an intervention touches this module (a :class:`Method` whose plan names an
intervention kind) and :mod:`vislens.steering` (that kind's edit of the logits).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import VislensError
from .registry import Registry

__all__ = [
    "BASELINE_KEY", "Condition", "ConditionResult", "METHODS", "Method", "NOISE_STEPS",
    "Param", "Plan", "SettingKey", "adaptvis_alpha", "check_conditions", "condition_help",
    "condition_label", "dola_candidates", "format_ranges", "parse_condition", "plan_conditions",
]

NOISE_STEPS = 1000  # VCD's diffusion schedule length


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Condition:
    """One decoding condition, e.g. ``scaling:alpha=0.5`` or ``adaptvis:alpha1=0.5,...``.

    ``params`` are the numeric parameters, ``options`` the string ones (DoLa's
    ``premature_layers``). ``layers``/``heads`` restrict the steering (None = all, as in
    the paper); only methods that steer accept them.
    """

    name: str
    method: str
    params: tuple[tuple[str, float], ...] = ()
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    options: tuple[tuple[str, str], ...] = ()

    def __getitem__(self, key: str) -> Any:
        merged = {**dict(self.options), **dict(self.params)}
        return merged[key]

    def attrs(self) -> dict[str, Any]:
        """What the capture file stores about this condition."""
        out: dict[str, Any] = {"method": self.method, "spec": self.spec()}
        out.update(dict(self.params))
        out.update(dict(self.options))
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.heads is not None:
            out["heads"] = list(self.heads)
        return out

    def spec(self) -> str:
        """The ``--condition`` text that recreates this condition."""
        parts = [f"{k}={v:g}" for k, v in self.params]
        parts += [f"{k}={v}" for k, v in self.options]
        if self.layers is not None:
            parts.append("layers=" + "+".join(map(str, self.layers)))
        if self.heads is not None:
            parts.append("heads=" + "+".join(map(str, self.heads)))
        return self.method + (":" + ",".join(parts) if parts else "")


@dataclass
class ConditionResult:
    """One sample under one condition.

    ``alpha_used`` is the temperature applied to the image-key logits (1.0 for the
    baseline, AdaptVis's per-sample choice) and NaN for methods without one (add, knockout,
    vcd, dola).
    """

    text: str
    first_token: int
    confidence: float
    option_probs: np.ndarray
    alpha_used: float
    image_attention: np.ndarray | None = None  # [L, H, G, G] (engine's attention_dtype)
    image_mass: np.ndarray | None = None  # [L, H]
    text_mass: np.ndarray | None = None  # [L, H]
    n_image_tokens: int = 0  # image tokens of this sample's prompt (Figure 3's token share)
    n_text_tokens: int = 0  # other non-padding prompt tokens
    #: [L, H] mean / max over the image keys of the answer row's logits after the
    #: intervention, before mask and softmax (Figure 26)
    image_logit_mean: np.ndarray | None = None
    image_logit_max: np.ndarray | None = None
    #: seconds of engine time per sample this condition needed (Table 9; see
    #: :meth:`vislens.decoding.DecodingEngine.run`), NaN when not measured
    compute_seconds: float = float("nan")
    extras: dict[str, Any] = field(default_factory=dict)


class SettingKey(NamedTuple):
    """One forward of the answer position, shared by every condition that uses it.

    ``kind`` names the intervention of :mod:`vislens.steering` (``"scale"``, ``"add"``,
    ``"knockout"``) acting on the image-key logits with ``value`` (one number for every
    row, or a tuple with one per row) in ``layers``/``heads`` (None = all). ``rule`` names
    the decoding rule of :mod:`vislens.decoding` that turns the logits into tokens
    (``"greedy"``, ``"vcd"``, ``"dola"``) with its arguments ``rule_args``.
    """

    kind: str
    value: float | tuple[float, ...] = 0.0
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    rule: str = "greedy"
    rule_args: tuple[tuple[str, Any], ...] = ()


#: the unsteered forward (a temperature of 1 on the image-key logits)
BASELINE_KEY = SettingKey("scale", 1.0)


@dataclass(frozen=True)
class Plan:
    """Where each batch row of one condition gets its result from.

    ``rows[i]`` is the setting whose forward gives row ``i`` its answer and attention,
    ``alpha_used[i]`` the temperature it applies (NaN: none). ``batched``, when given, is one
    setting with a value per row that gives the same answers as ``rows`` in a single forward.
    """

    rows: tuple[SettingKey, ...]
    alpha_used: tuple[float, ...]
    batched: SettingKey | None = None


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class Param:
    """A declared method parameter: ``kind`` ``"float"``, ``"int"`` (an integer-valued
    number) or ``"str"``; ``default`` None means required; ``lo``/``hi`` bound numbers
    (open bounds excluded); ``why`` explains the range in errors."""

    name: str
    default: float | str | None = None
    kind: str = "float"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is None

    def convert(self, text: str, where: str) -> float | str:
        if self.kind == "str":
            if not text:
                raise VislensError(f"{where}: {self.name}= is empty")
            return text
        try:
            return float(text)
        except ValueError:
            raise VislensError(f"{where}: {self.name}={text!r} is not a number") from None

    def check(self, value: float | str, where: str) -> None:
        """One-line error unless ``value`` is finite, of the right kind and in range."""
        if self.kind == "str":
            return
        v = float(value)
        if not math.isfinite(v):
            raise VislensError(f"{where}: {self.name}={v} is not finite")
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        if not (lo_ok and hi_ok and (self.kind != "int" or v.is_integer())):
            why = f" ({self.why})" if self.why else ""
            raise VislensError(f"{where}: {self.name}={v:g} must be {self.range_text()}{why}")

    def range_text(self) -> str:
        kind = "an integer " if self.kind == "int" else ""
        if self.lo is not None and self.hi is not None:
            return (f"{kind}in {'(' if self.lo_open else '['}{self.lo:g}, "
                    f"{self.hi:g}{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{kind}{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{kind}{'<' if self.hi_open else '<='} {self.hi:g}"
        return kind.strip() or "a number"


_TEMPERATURE = dict(lo=0.0, lo_open=True, why="a temperature")


_INT_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_MAX_RANGE = 1 << 16  # far beyond any model's layers or heads; bounds what a range expands to


def _parse_ints(text: str, where: str) -> tuple[int, ...]:
    """``"8-15+20"`` -> (8, ..., 15, 20); an empty result or a reversed part is an error."""
    out: set[int] = set()
    for part in text.replace("+", " ").replace(";", " ").split():
        m = _INT_RANGE.fullmatch(part)
        if m is None:
            raise VislensError(f"{where}: expected integers like 0-15 or 3+7, got {text!r}")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:  # a reversed part is refused, also beside others (5-2+7 is not just 7)
            raise VislensError(f"{where}: {part!r} selects nothing (write ranges low-high, e.g. 2-5)")
        if hi - lo >= _MAX_RANGE:
            raise VislensError(f"{where}: {part} spans more than {_MAX_RANGE} indices")
        out.update(range(lo, hi + 1))
    if not out:
        raise VislensError(f"{where}: {text!r} selects nothing (write ranges low-high, e.g. 2-5)")
    return tuple(sorted(out))


def format_ranges(values: Sequence[int]) -> str:
    """(0, 1, 2, 5, 7, 8) -> ``"0-2+5+7-8"``."""
    vals = sorted(int(v) for v in values)
    parts, start = [], None
    for i, v in enumerate(vals):
        if start is None:
            start = v
        if i + 1 == len(vals) or vals[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return "+".join(parts)


def _check_indices(values: Sequence[int] | None, count: int | None, what: str, where: str) -> None:
    if values is None or count is None:
        return
    bad = [v for v in values if not 0 <= v < count]
    if bad:
        raise VislensError(f"{where}: {what}={format_ranges(values)} is outside the model "
                           f"(valid {what}: 0-{count - 1})")


# ----------------------------------------------------------------------------- methods

class Method:
    """One decoding method. Subclasses declare ``name``, ``params``, ``steers`` (accepts a
    ``layers=``/``heads=`` restriction) and ``needs_confidence`` (its plan uses the
    unsteered confidence), and implement :meth:`plan` and :meth:`label`."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    steers: ClassVar[bool] = True
    needs_confidence: ClassVar[bool] = False

    # -- declaration -------------------------------------------------------------------
    def option_names(self) -> list[str]:
        return [p.name for p in self.params] + (["layers", "heads"] if self.steers else []) + ["name"]

    def usage(self) -> str:
        """``scaling:alpha=A`` style help from the declared parameters."""
        req = [f"{p.name}={p.name.upper()}" for p in self.params if p.required]
        opt = [f"{p.name}={p.default:g}" if p.kind != "str" else f"{p.name}={p.default}"
               for p in self.params if not p.required]
        text = self.name + (":" + ",".join(req) if req else "")
        return text + (f"[{',' if req else ':'}{','.join(opt)}]" if opt else "")

    # -- validation --------------------------------------------------------------------
    def validate(self, cond: Condition, num_layers: int | None = None,
                 num_heads: int | None = None) -> None:
        """Parameter ranges, the restriction (against the model's counts when given)."""
        where = f"condition {cond.name}"
        values = {**dict(cond.params), **dict(cond.options)}
        unknown = sorted(set(values) - {p.name for p in self.params})
        if unknown:
            raise VislensError(f"{where}: unknown option {unknown[0]!r} for {self.name} "
                               f"(allowed: {', '.join(self.option_names())})")
        for p in self.params:
            if p.name not in values:
                raise VislensError(f"{where}: missing {p.name}")
            p.check(values[p.name], where)
        if not self.steers and (cond.layers is not None or cond.heads is not None):
            raise VislensError(f"{where}: {self.name} does not steer attention; it takes no "
                               "layers=/heads= restriction")
        for what, sel in (("layers", cond.layers), ("heads", cond.heads)):
            if sel is not None and not sel:
                raise VislensError(f"{where}: {what}= selects nothing")
        _check_indices(cond.layers, num_layers, "layers", where)
        _check_indices(cond.heads, num_heads, "heads", where)

    # -- naming ------------------------------------------------------------------------
    def default_name(self, cond: Condition) -> str:
        return self.name

    def label(self, attrs: Mapping[str, Any]) -> str | None:
        """Plot label from stored attrs; None when they lack what it needs."""
        return self.name

    # -- planning ----------------------------------------------------------------------
    def plan(self, cond: Condition, n: int, confidence: np.ndarray | None) -> Plan:
        raise NotImplementedError

    @staticmethod
    def _same(key: SettingKey, n: int, alpha: float = math.nan) -> Plan:
        return Plan((key,) * n, (float(alpha),) * n)


METHODS: Registry[Method] = Registry("condition method")


def _method(cls: type[Method]) -> type[Method]:
    METHODS.add(cls.name, cls())
    return cls


def _where(attrs: Mapping[str, Any]) -> str:
    out = ""
    for what in ("layers", "heads"):
        if attrs.get(what) is not None:
            out += f", {what} {format_ranges(np.atleast_1d(attrs[what]))}"
    return out


@_method
class Baseline(Method):
    """Greedy decoding without intervention (temperature 1)."""

    name = "baseline"
    steers = False

    def plan(self, cond, n, confidence):
        return self._same(BASELINE_KEY, n, 1.0)


@_method
class Scaling(Method):
    """ScalingVis (paper Eq. 2): image-key logits times ``alpha``."""

    name = "scaling"
    params = (Param("alpha", **_TEMPERATURE),)

    def default_name(self, cond):
        return f"scaling-{cond['alpha']:g}"

    def label(self, attrs):
        return f"ScalingVis α={attrs['alpha']:g}{_where(attrs)}" if "alpha" in attrs else None

    def plan(self, cond, n, confidence):
        return self._same(_scale(cond["alpha"], cond), n, cond["alpha"])


def _scale(alpha: float, cond: Condition) -> SettingKey:
    alpha = float(alpha)
    return BASELINE_KEY if alpha == 1.0 else SettingKey("scale", alpha, cond.layers, cond.heads)


def adaptvis_alpha(confidence: np.ndarray, alpha1: float, alpha2: float, beta: float) -> np.ndarray:
    """Eq. 3: alpha1 (smooth) where the unsteered confidence is below beta, else alpha2."""
    confidence = np.asarray(confidence, dtype=np.float64)
    return np.where(confidence < beta, alpha1, alpha2)


@_method
class AdaptVis(Method):
    """AdaptVis (Eq. 3): per sample, alpha1 below the confidence threshold beta, else alpha2."""

    name = "adaptvis"
    params = (Param("alpha1", **_TEMPERATURE), Param("alpha2", **_TEMPERATURE),
              Param("beta", lo=0.0, hi=1.0, why="a probability threshold"))
    needs_confidence = True

    def validate(self, cond, num_layers=None, num_heads=None):
        super().validate(cond, num_layers, num_heads)
        if not cond["alpha1"] <= cond["alpha2"]:
            raise VislensError(f"condition {cond.name}: alpha1={cond['alpha1']:g} should smooth "
                               f"and alpha2={cond['alpha2']:g} sharpen (alpha1 <= alpha2)")

    def label(self, attrs):
        if not {"alpha1", "alpha2", "beta"} <= attrs.keys():
            return None
        return (f"AdaptVis (α₁={attrs['alpha1']:g}, α₂={attrs['alpha2']:g}, "
                f"β={attrs['beta']:g}){_where(attrs)}")

    def plan(self, cond, n, confidence):
        alphas = adaptvis_alpha(confidence, cond["alpha1"], cond["alpha2"], cond["beta"])
        rows = tuple(_scale(a, cond) for a in alphas.tolist())
        batched = SettingKey("scale", tuple(float(a) for a in alphas), cond.layers, cond.heads)
        return Plan(rows, tuple(float(a) for a in alphas), batched)


@_method
class Add(Method):
    """Figure 4: ``delta`` added to the image-key logits (image weights times e**delta)."""

    name = "add"
    params = (Param("delta"),)

    def default_name(self, cond):
        return f"add{cond['delta']:+g}"  # add+1, add-0.5

    def label(self, attrs):
        return f"add δ={attrs['delta']:g}{_where(attrs)}" if "delta" in attrs else None

    def plan(self, cond, n, confidence):
        delta = float(cond["delta"])
        key = BASELINE_KEY if delta == 0.0 else SettingKey("add", delta, cond.layers, cond.heads)
        return self._same(key, n)


@_method
class Knockout(Method):
    """Attention knockout: the answer row's image-key logits set to -inf (no image mass)."""

    name = "knockout"

    def label(self, attrs):
        return f"image knockout{_where(attrs)}"

    def plan(self, cond, n, confidence):
        return self._same(SettingKey("knockout", 0.0, cond.layers, cond.heads), n)


@_method
class VCD(Method):
    """Visual contrastive decoding against a diffusion-noised image (no steering)."""

    name = "vcd"
    steers = False
    params = (Param("alpha", 1.0, lo=0.0), Param("beta", 0.1, lo=0.0, lo_open=True, hi=1.0,
                                                 why="the plausibility cutoff"),
              Param("noise_steps", 500.0, kind="int", lo=1, hi=NOISE_STEPS - 1,
                    why="steps along VCD's noise schedule; 0, no noise, leaves nothing to contrast"),
              Param("seed", 0.0, kind="int"))

    def label(self, attrs):
        return "VCD"

    def plan(self, cond, n, confidence):
        return self._same(SettingKey("scale", 1.0, rule="vcd", rule_args=cond.params), n)


def dola_candidates(spec: str, num_layers: int, tied_embeddings: bool = False) -> list[int]:
    """Premature-layer candidates (hidden-state indices; 0 = embeddings) for DoLa.

    ``"low"``/``"high"``: every second layer of the lower/upper half (for models over 40
    layers, the first/last 20), as the DoLa paper and transformers 4.x did; or an explicit
    list such as ``"0+2+4"``. The final layer is never a candidate. With
    ``tied_embeddings`` (the LM head is the input embedding, e.g. Qwen2-VL-2B), ``"low"``
    starts at layer 2 (layer 1 for a 2-layer model) as transformers does: read through the
    tied head, the embeddings' own exit is close to the identity and contrasts with nothing.
    """
    where = f"dola premature_layers={spec!r}"
    if spec in ("low", "high"):
        start = 0 if not tied_embeddings else (2 if num_layers > 2 else num_layers - 1)
        if num_layers <= 40:
            lo, hi = (start, num_layers // 2) if spec == "low" else (num_layers // 2, num_layers)
        else:
            lo, hi = (start, 20) if spec == "low" else (num_layers - 20, num_layers)
        layers = list(range(lo, hi, 2)) or [lo]
    else:
        layers = list(_parse_ints(spec, where))
    bad = [v for v in layers if not 0 <= v < num_layers]
    if bad or not layers:
        raise VislensError(f"{where}: need indices in [0, {num_layers - 1}] "
                           f"(0 = embeddings, {num_layers} = final layer)")
    return layers


@_method
class DoLa(Method):
    """DoLa: contrast the final layer with the most divergent premature layer (no steering).

    ``premature_layers`` (spelled ``layers=`` on the command line, as DoLa does) is
    ``high``, ``low`` or a list such as ``0+2+4``.
    """

    name = "dola"
    steers = False
    params = (Param("relative_top", 0.1, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
              Param("premature_layers", "high", kind="str", aliases=("layers",)))

    def validate(self, cond, num_layers=None, num_heads=None):
        super().validate(cond, num_layers, num_heads)
        spec = cond["premature_layers"]
        if spec not in ("low", "high"):
            _parse_ints(spec, f"condition {cond.name}: premature_layers")
        if num_layers is not None:
            dola_candidates(spec, num_layers)

    def label(self, attrs):
        return "DoLa"

    def plan(self, cond, n, confidence):
        args = tuple(cond.params) + tuple(cond.options)
        return self._same(SettingKey("scale", 1.0, rule="dola", rule_args=args), n)


# ----------------------------------------------------------------------------- parsing

def parse_condition(text: str) -> Condition:
    """Parse ``method[:key=value,...]`` (the ``--condition`` syntax) and validate it.

    Layers/heads take ranges joined by ``+``: ``scaling:alpha=2,layers=8-15+20``. Counts
    of a model are checked by :func:`check_conditions`.
    """
    method_name, _, rest = text.strip().partition(":")
    try:
        method = METHODS.get(method_name.strip().lower())
    except VislensError as e:
        raise VislensError(f"condition {text!r}: {e}") from None
    where = f"condition {text!r}"
    allowed = method.option_names()
    aliases = {a: p.name for p in method.params for a in p.aliases}
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        key = aliases.get(key.strip(), key.strip())
        if not eq:
            raise VislensError(f"{where}: expected key=value, got {item!r}")
        if key not in allowed:
            raise VislensError(f"{where}: unknown option {key!r} for {method.name} "
                               f"(allowed: {', '.join(allowed)})")
        if key in values:
            raise VislensError(f"{where}: {key} given twice")
        values[key] = val.strip()
    missing = [p.name for p in method.params if p.required and p.name not in values]
    if missing:
        raise VislensError(f"{where}: missing {', '.join(missing)}")
    params, options = [], []
    for p in method.params:
        v = p.convert(values[p.name], where) if p.name in values else p.default
        (options if p.kind == "str" else params).append((p.name, v if p.kind == "str" else float(v)))
    sel = {k: _parse_ints(values[k], f"{where}: {k}") for k in ("layers", "heads") if k in values}
    cond = Condition(name="", method=method.name, params=tuple(params), options=tuple(options),
                     layers=sel.get("layers"), heads=sel.get("heads"))
    name = values.get("name") or method.default_name(cond)
    cond = Condition(name, cond.method, cond.params, cond.layers, cond.heads, cond.options)
    check_conditions([cond])
    return cond


def check_conditions(conds: Sequence[Condition], num_layers: int | None = None,
                     num_heads: int | None = None) -> None:
    """Validate a job's conditions, against a model's layer/head counts when given.

    Called before any file is created or weights are loaded (the counts come from the
    model config). One-line :class:`VislensError` on the first problem.
    """
    if not conds:
        raise VislensError("no condition given (e.g. --condition baseline)")
    names = [c.name for c in conds]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VislensError(f"two conditions are named {dup[0]!r}; add name=... to one of them")
    for c in conds:
        if not c.name or "/" in c.name or c.name.startswith("."):
            raise VislensError(f"condition name {c.name!r}: must be non-empty, without '/', "
                               "not starting with '.'")
        if c.name in METHODS.names() and c.name != c.method:  # analyses find 'baseline' by name
            raise VislensError(f"condition name {c.name!r}: the name of another method; a "
                               f"{c.method} condition cannot be called that")
        METHODS.get(c.method).validate(c, num_layers, num_heads)


def condition_help() -> str:
    """The ``--condition`` syntax of every registered method (CLI help)."""
    steering = "/".join(n for n, m in METHODS.items() if m.steers)
    return (" | ".join(m.usage() for _, m in METHODS.items())
            + f" ({steering} also take layers=8-15,heads=0+3; any takes name=N); repeatable")


def condition_label(name: str, attrs: Mapping[str, Any] | None = None) -> str:
    """Human label of a condition from its stored attrs, e.g. ``ScalingVis α=0.5``."""
    a = dict(attrs or {})
    method = a.get("method", "")
    if method not in METHODS:
        return name
    return METHODS.get(method).label(a) or name


# ----------------------------------------------------------------------------- planning

def plan_conditions(conds: Sequence[Condition], n: int,
                    confidence: Callable[[], np.ndarray]) -> dict[str, Plan]:
    """Each condition's per-row settings for a batch of ``n`` rows.

    ``confidence()`` runs the unsteered first token and returns its max-probability per
    row; it is called once, only if some method needs it. A plan with per-row settings is
    collapsed into its ``batched`` single forward unless every per-row setting is planned
    anyway by another condition.
    """
    plans: dict[str, Plan] = {}
    adaptive = []
    for c in conds:
        m = METHODS.get(c.method)
        if m.needs_confidence:
            adaptive.append((c, m))
        else:
            plans[c.name] = m.plan(c, n, None)
    if adaptive:
        conf = np.asarray(confidence(), dtype=np.float64)
        for c, m in adaptive:
            plans[c.name] = m.plan(c, n, conf)
    static = {k for name, p in plans.items() for k in p.rows if p.batched is None}
    out = {}
    for name, p in plans.items():
        if p.batched is not None and len(set(p.rows)) > 1 and not set(p.rows) <= static:
            p = Plan((p.batched,) * n, p.alpha_used)
        out[name] = p
    return out
