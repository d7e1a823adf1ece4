"""Attention steering and recording at the answer position, through ``AttentionInterface``.

vislens registers one attention function, ``"vislens"``, in transformers' attention registry
(and the SDPA mask builder under the same name in ``AttentionMaskInterface``). Model adapters
switch the *language model* to it; the vision tower keeps SDPA. When no :class:`Steerer` is
armed it is plain SDPA. When armed, it runs SDPA for every query and then recomputes only the
last query's row (the last prompt token, the position that produces the answer) in fp32::

    logits = q_last . K^T * scale                      # [B, H, K]
    hook "attn.logits"   -> interventions edit logits on image keys (before the mask)
    record: mean and max of the edited logits over each row's image keys
    logits += mask                                      # causal / padding
    probs = softmax(logits)
    hook "attn.pattern"  -> recording reads the row
    out[last] = probs . V                               # only where an intervention acted

Hook points are named TransformerLens-style, ``blocks.{layer}.attn.logits`` and
``blocks.{layer}.attn.pattern`` (``attn.logits`` / ``attn.pattern`` alone: every layer); user
hooks are added with :meth:`Steerer.add_hook` and receive a :class:`HookPoint`.

Interventions are the kinds of :data:`INTERVENTIONS`: ScalingVis (paper Eq. 2) multiplies the
image-key logits by ``alpha``; the Figure 4 experiment adds ``delta`` to them (a factor
``e**delta`` in probability space); knockout sets them to -inf (the answer row gives the
image no weight). Each takes one value per batch row, so AdaptVis can give each sample its
own alpha in a single forward.
"""
from __future__ import annotations

import contextvars
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .errors import VislensError
from .registry import Registry

ATTN_NAME = "vislens"
HOOK_POINTS = ("attn.logits", "attn.pattern")

_ACTIVE: contextvars.ContextVar["Steerer | None"] = contextvars.ContextVar("vislens_steerer",
                                                                          default=None)
_REGISTERED = False


def register_attention() -> str:
    """Register the ``"vislens"`` attention and mask functions once; returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, vislens_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _REGISTERED = True
    return ATTN_NAME


# ----------------------------------------------------------------------------- interventions

@dataclass(frozen=True)
class Edit:
    """How one intervention kind changes image-key logits.

    ``fn(logits, value)``: ``logits`` [B, H, K] fp32, ``value`` [B, 1, 1] (one per row);
    returns the edited logits (only image keys of the selected heads are kept from it).
    ``neutral`` is the value that changes nothing (None: every value edits).
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    neutral: float | None


#: intervention kind -> its edit; conditions name these kinds in their settings
INTERVENTIONS: Registry[Edit] = Registry("intervention kind")
INTERVENTIONS.add("scale", Edit(lambda x, v: x * v, 1.0))  # ScalingVis (Eq. 2)
INTERVENTIONS.add("add", Edit(lambda x, v: x + v, 0.0))  # Figure 4: odds times e**delta
INTERVENTIONS.add("knockout", Edit(lambda x, v: torch.full_like(x, float("-inf")), None))


@dataclass
class Intervention:
    """An edit of the answer position's image-key logits.

    ``kind`` names an entry of :data:`INTERVENTIONS`: ``"scale"`` (ScalingVis: logits *
    value), ``"add"`` (logits + value) or ``"knockout"`` (-inf: the row gives image keys no
    weight; value unused). ``value`` holds one number per batch row. ``layers``/``heads``
    restrict it (None = all); ``rows`` (bool, one per batch row) too, so that several
    interventions can share one forward, each on its own rows (None = all rows).
    """

    kind: str
    value: torch.Tensor
    layers: frozenset[int] | None = None
    heads: tuple[int, ...] | None = None
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTIONS:
            raise VislensError(f"intervention kind must be one of {', '.join(INTERVENTIONS)}, "
                             f"got {self.kind!r}")
        self.edit = INTERVENTIONS.get(self.kind)
        if not torch.isfinite(self.value).all():
            raise VislensError(f"intervention {self.kind} has a non-finite value: {self.value.tolist()}")
        if self.rows is not None and self.rows.shape != self.value.shape:
            raise VislensError(f"intervention rows {tuple(self.rows.shape)} do not match its values "
                             f"{tuple(self.value.shape)}")
        for name in ("layers", "heads"):  # empty would steer nothing: a silent no-op
            chosen = getattr(self, name)
            if chosen is not None and not len(chosen):
                raise VislensError(f"intervention {self.kind}: {name} is empty; give at least one, "
                                 "or None for all")

    def is_identity(self) -> bool:
        neutral = self.edit.neutral
        value = self.value if self.rows is None else self.value[self.rows]
        return neutral is not None and bool((value == neutral).all())

    def applies(self, layer: int) -> bool:
        return (self.layers is None or layer in self.layers) and not self.is_identity()

    def apply(self, logits: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, H, K] fp32, ``image_keys`` [B, K] bool."""
        v = self.value.to(logits.device, logits.dtype)[:, None, None]
        edited = self.edit.fn(logits, v)
        where = image_keys[:, None, :]
        if self.rows is not None:
            where = where & self.rows.to(logits.device)[:, None, None]
        if self.heads is not None:
            n_heads = logits.shape[1]
            if max(self.heads) >= n_heads or min(self.heads) < 0:
                raise VislensError(f"intervention heads {list(self.heads)} outside the model's "
                                 f"heads 0-{n_heads - 1}")
            head_sel = torch.zeros(n_heads, dtype=torch.bool, device=logits.device)
            head_sel[list(self.heads)] = True
            where = where & head_sel[None, :, None]
        return torch.where(where, edited, logits)


# ----------------------------------------------------------------------------- hooks

@dataclass(frozen=True)
class HookPoint:
    """What a hook is called with besides the tensor: where it runs.

    ``name`` is the full TransformerLens-style name (``blocks.3.attn.logits``), ``point``
    the layer-free part (``attn.logits``), ``layer`` the language-model layer.
    """

    name: str
    point: str
    layer: int
    steerer: "Steerer"


#: ``fn(tensor, hook)``: may return a replacement tensor at ``attn.logits`` (None: keep)
Hook = Callable[[torch.Tensor, HookPoint], "torch.Tensor | None"]
#: the original signature ``fn(layer, tensor, steerer)``, still accepted
LegacyHook = Callable[[int, torch.Tensor, "Steerer"], "torch.Tensor | None"]

_NAME = re.compile(r"^(?:blocks\.(\d+)\.)?(attn\.logits|attn\.pattern)$")


def hook_name(layer: int, point: str) -> str:
    return f"blocks.{layer}.{point}"


def _matcher(names) -> tuple[Callable[[str, int, str], bool], set[int]]:
    """(match(point, layer, full_name), layers named explicitly) for ``add_hook``'s names."""
    if callable(names):
        return (lambda point, layer, full: bool(names(full))), set()
    items = [names] if isinstance(names, str) else list(names)
    if not items:
        raise VislensError("add_hook: no hook name given")
    wanted: set[tuple[int | None, str]] = set()
    for item in items:
        m = _NAME.match(item) if isinstance(item, str) else None
        if m is None:
            raise VislensError(f"unknown hook point {item!r}; use attn.logits, attn.pattern or "
                             "blocks.{layer}.attn.logits / blocks.{layer}.attn.pattern")
        wanted.add((None if m.group(1) is None else int(m.group(1)), m.group(2)))
    explicit = {layer for layer, _ in wanted if layer is not None}
    return (lambda point, layer, full: (None, point) in wanted or (layer, point) in wanted), explicit


def _as_hook(fn: Hook | LegacyHook) -> Hook:
    """Wrap the documented three-argument form ``fn(layer, tensor, steerer)``.

    Only required positional parameters count: ``fn(t, hook, factor=2.0)`` is the
    ``(tensor, hook)`` form with an option."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    if len(positional) == 3 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        return lambda t, hook: fn(hook.layer, t, hook.steerer)
    return fn


@dataclass
class Steerer:
    """Arms the ``"vislens"`` attention for the next forward passes of one model.

    Use as a context manager around the forward you want to steer or record::

        with Steerer(image_keys, interventions=[Intervention("scale", alpha)], record=True) as s:
            s.add_hook("blocks.3.attn.pattern", lambda probs, hook: print(hook.name))
            model(**inputs)
        rows = s.records   # {layer: [B, H, K] softmax row of the last query, fp32}
        stats = s.logit_stats   # {layer: (mean, max)}, each [B, H]: image-key logits

    ``logit_stats`` (when ``record``) holds the mean and max over each row's image keys of
    the last query's logits ``q.k * scale`` after the interventions and ``attn.logits``
    hooks, before the mask and softmax (Figure 26's "attention logits"; ScalingVis
    multiplies them by alpha). A row without image keys gets NaN; knocked-out keys -inf;
    a sliding-window layer counts only the image keys in its window.

    ``image_keys`` [B, K] marks image-token keys over the full (padded) sequence, K being
    the key length of the steered forward (prefix cache included). Hooks are removed when
    the context exits; a hook or intervention naming a layer the model never ran is an
    error there (nothing is silently skipped).
    """

    image_keys: torch.Tensor
    interventions: list[Intervention] = field(default_factory=list)
    record: bool = True
    records: dict[int, torch.Tensor] = field(default_factory=dict)
    logit_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hooks: list[tuple[Callable[[str, int, str], bool], str, set[int], Hook]] = field(default_factory=list)
    _token: contextvars.Token | None = None
    _seen: set[int] = field(default_factory=set)

    def add_hook(self, names: "str | Iterable[str] | Callable[[str], bool]", fn: Hook | LegacyHook
                 ) -> "Steerer":
        """Call ``fn(tensor, hook)`` at the named hook points.

        ``names``: ``"attn.logits"`` / ``"attn.pattern"`` (every layer), a full name such as
        ``"blocks.3.attn.logits"``, a list of these, or a filter ``name -> bool`` over full
        names. ``hook`` is a :class:`HookPoint` (``.name``, ``.layer``, ``.point``). A hook at
        ``attn.logits`` may return replacement logits; None keeps them. The three-argument
        form ``fn(layer, tensor, steerer)`` is accepted too.
        """
        match, explicit = _matcher(names)
        hook = _as_hook(fn)
        for point in HOOK_POINTS:
            self.hooks.append((match, point, explicit, hook))
        return self

    def __enter__(self) -> "Steerer":
        register_attention()
        self._seen = set()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None
        named = set().union(*(e for _, _, e, _ in self.hooks)) if self.hooks else set()
        self.hooks = []
        if exc_type is None and self._seen:
            named |= set().union(*(iv.layers for iv in self.interventions if iv.layers is not None))
            missing = sorted(named - self._seen)
            if missing:
                raise VislensError(f"layer(s) {missing} named by a hook or intervention never ran; "
                                 f"the model ran layers {min(self._seen)}-{max(self._seen)}")

    # -- called from the attention function -------------------------------------------
    def _hooks_at(self, point: str, layer: int) -> list[tuple[HookPoint, Hook]]:
        name = hook_name(layer, point)
        return [(HookPoint(name, point, layer, self), fn)
                for match, p, _, fn in self.hooks if p == point and match(point, layer, name)]

    def wants(self, layer: int) -> bool:
        self._seen.add(layer)
        return (self.record or any(self._hooks_at(p, layer) for p in HOOK_POINTS)
                or any(iv.applies(layer) for iv in self.interventions))

    def edits(self, layer: int) -> bool:
        return bool(self._hooks_at("attn.logits", layer)) or any(iv.applies(layer)
                                                                 for iv in self.interventions)

    def _keys(self, layer: int, logits: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The image-key mask of the keys the layer holds: from key ``first`` on (a
        sliding-window cache keeps only the last keys of the sequence)."""
        keys = self.image_keys.to(logits.device)
        if keys.shape[-1] - first != logits.shape[-1]:
            raise VislensError(f"image key mask covers {keys.shape[-1] - first} keys but layer "
                             f"{layer} attends over {logits.shape[-1]}")
        return keys[:, first:]

    def steer_logits(self, layer: int, logits: torch.Tensor, first: int = 0) -> torch.Tensor:
        keys = self._keys(layer, logits, first)
        for iv in self.interventions:
            if iv.applies(layer):
                logits = iv.apply(logits, keys)
        for hook, fn in self._hooks_at("attn.logits", layer):
            out = fn(logits, hook)
            logits = logits if out is None else out
        return logits

    def see_logits(self, layer: int, logits: torch.Tensor, first: int = 0,
                   visible: torch.Tensor | None = None) -> None:
        """Record the mean and max of the (edited, unmasked) logits over the image keys the
        row may attend to (``visible`` [B, K]: not hidden by the mask, e.g. a sliding window;
        padding is never an image key)."""
        if self.record:
            keys = self._keys(layer, logits, first)
            if visible is not None:
                keys = keys & visible
            self.logit_stats[layer] = image_logit_stats(logits.detach(), keys)

    def see_pattern(self, layer: int, probs: torch.Tensor, first: int = 0) -> None:
        """Record the softmax row over all keys of the sequence: the ``first`` keys a
        sliding-window cache no longer holds get weight 0, as under the full mask."""
        if first:
            probs = torch.nn.functional.pad(probs, (first, 0))
        if self.record:
            self.records[layer] = probs.detach()
        for hook, fn in self._hooks_at("attn.pattern", layer):
            fn(probs, hook)


def last_row_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-softmax logits of the last query over all keys, fp32, GQA without repeat_kv.

    ``query`` [B, H, Q, D], ``key`` [B, Hkv, K, D] -> [B, H, K].
    """
    b, h, _, d = query.shape
    hkv = key.shape[1]
    q = query[:, :, -1, :].float().reshape(b, hkv, h // hkv, d)
    logits = torch.matmul(q, key.float().transpose(-1, -2))  # [B, Hkv, rep, K]
    return logits.reshape(b, h, -1) * scaling


def image_logit_stats(logits: torch.Tensor, image_keys: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of ``logits`` [B, H, K] over each row's image keys ``image_keys`` [B, K]
    (padding is never an image key): two [B, H] fp32 tensors, NaN for a row without image
    keys (-inf where the keys were knocked out)."""
    keys = image_keys[:, None, :]
    n = image_keys.sum(-1).to(logits.dtype)[:, None]  # [B, 1]
    total = torch.where(keys, logits, torch.zeros((), dtype=logits.dtype,
                                                  device=logits.device)).sum(-1)
    mean = total / n
    top = logits.masked_fill(~keys, float("-inf")).amax(-1)
    none = (n == 0).expand_as(top)
    return mean.masked_fill(none, float("nan")), top.masked_fill(none, float("nan"))


def _mask_row(attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :]
    if row.shape[0] != batch:
        row = row.expand(batch, -1)
    return row


def _visible(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Keys a mask row lets the query see: bool masks say so, additive ones are 0 there (and
    the dtype's minimum or -inf where hidden)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def vislens_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The registered attention function: SDPA, plus steering of the last query's row.

    Under an armed shared-prefix cache (:mod:`vislens.shared_prefix`, the engine's fused
    settings) ``key``/``value`` are each row's suffix and the single query attends over the
    shared prefix and its suffix in one fp32 softmax (steered like the last row)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .shared_prefix import shared_layer

    steerer = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    active = steerer is not None and layer is not None and steerer.wants(layer)
    shared = shared_layer(layer)
    if not active and shared is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len = query.shape[2]
    if shared is not None and q_len != 1:
        raise RuntimeError(f"a shared-prefix cache takes one query per row, got {q_len}")
    if not active:  # shared prefix, nothing to steer or record
        return shared.attend(query, key, value, _mask_row(attention_mask, query.shape[0]),
                             scaling), None
    edits = steerer.edits(layer)
    out = None
    if shared is not None:
        logits = shared.logits(query, key, scaling)
    else:
        if q_len > 1 or not edits:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                            scaling=scaling, dropout=dropout, **kwargs)
        logits = last_row_logits(query, key, scaling)
    # a sliding-window layer's cache holds only the last keys of the sequence
    first = steerer.image_keys.shape[-1] - logits.shape[-1] \
        if getattr(module, "sliding_window", None) else 0
    first = max(first, 0)
    if edits:
        logits = steerer.steer_logits(layer, logits, first)
    mask = _mask_row(attention_mask, logits.shape[0])
    if mask is not None:
        mask = mask.to(logits.device)
    steerer.see_logits(layer, logits, first, _visible(mask))
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf")) if mask.dtype == torch.bool \
            else logits + mask[:, None, :].float()
    probs = torch.softmax(logits, dim=-1)
    steerer.see_pattern(layer, probs, first)
    if shared is not None:
        return shared.output(probs, value), None
    if not edits:
        return out, None
    b, h, k = probs.shape
    hkv = value.shape[1]
    row = torch.matmul(probs.reshape(b, hkv, h // hkv, k), value.float()).reshape(b, h, -1)
    row = row.to(value.dtype)
    if out is None:  # q_len == 1: the row is the whole output, [B, 1, H, D]
        return row[:, None], None
    out[:, -1] = row
    return out, None


def interventions_for(kind: str, values: Iterable[float] | torch.Tensor, *,
                      layers: Iterable[int] | None = None,
                      heads: Iterable[int] | None = None,
                      rows: torch.Tensor | None = None) -> list[Intervention]:
    """One :class:`Intervention` from per-row values (empty list for identity)."""
    v = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values,
                        dtype=torch.float32)
    iv = Intervention(kind, v, frozenset(layers) if layers is not None else None,
                      tuple(heads) if heads is not None else None, rows)
    return [] if iv.is_identity() else [iv]
