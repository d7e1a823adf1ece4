"""Attention steering and recording at the answer position, through ``AttentionInterface``.

vislens registers one attention function, ``"vislens"``, in transformers' attention registry
(and the SDPA mask builder under the same name in ``AttentionMaskInterface``). Model adapters
switch the *language model* to it; the vision tower keeps SDPA. When no :class:`Steerer` is
armed it is plain SDPA. When armed, it runs SDPA for every query and then recomputes only the
last query's row (the last prompt token, the position that produces the answer) in fp32::

    logits = q_last . K^T * scale                      # [B, H, K]
    hook "attn.logits"   -> interventions edit logits on image keys (before the mask)
    logits += mask                                      # causal / padding
    probs = softmax(logits)
    hook "attn.pattern"  -> recording reads the row
    out[last] = probs . V                               # only where an intervention acted

Hook points are named TransformerLens-style (``blocks.{layer}.attn.logits`` and
``blocks.{layer}.attn.pattern``); user hooks can be added with :meth:`Steerer.add_hook`.

ScalingVis (paper Eq. 2) multiplies the image-key logits by ``alpha``; the Figure 4
experiment adds ``delta`` to them (a factor ``e**delta`` in probability space). Both take one
value per batch row, so AdaptVis can give each sample its own alpha in a single forward.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

ATTN_NAME = "vislens"
HOOK_POINTS = ("attn.logits", "attn.pattern")

_ACTIVE: contextvars.ContextVar["Steerer | None"] = contextvars.ContextVar("vislens_steerer",
                                                                          default=None)
_REGISTERED = False

Hook = Callable[[int, torch.Tensor, "Steerer"], "torch.Tensor | None"]


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


@dataclass
class Intervention:
    """An edit of the answer position's image-key logits.

    ``kind`` is ``"scale"`` (ScalingVis: logits * value) or ``"add"`` (logits + value);
    ``value`` holds one number per batch row. ``layers``/``heads`` restrict it (None = all).
    """

    kind: str
    value: torch.Tensor
    layers: frozenset[int] | None = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("scale", "add"):
            raise ValueError(f"intervention kind must be 'scale' or 'add', got {self.kind!r}")
        if not torch.isfinite(self.value).all():
            raise ValueError(f"intervention {self.kind} has a non-finite value: {self.value.tolist()}")

    def is_identity(self) -> bool:
        neutral = 1.0 if self.kind == "scale" else 0.0
        return bool((self.value == neutral).all())

    def applies(self, layer: int) -> bool:
        return (self.layers is None or layer in self.layers) and not self.is_identity()

    def apply(self, logits: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, H, K] fp32, ``image_keys`` [B, K] bool."""
        v = self.value.to(logits.device, logits.dtype)[:, None, None]
        edited = logits * v if self.kind == "scale" else logits + v
        where = image_keys[:, None, :]
        if self.heads is not None:
            head_sel = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            head_sel[list(self.heads)] = True
            where = where & head_sel[None, :, None]
        return torch.where(where, edited, logits)


@dataclass
class Steerer:
    """Arms the ``"vislens"`` attention for the next forward passes of one model.

    Use as a context manager around the forward you want to steer or record::

        with Steerer(image_keys, interventions=[Intervention("scale", alpha)], record=True) as s:
            model(**inputs)
        rows = s.records   # {layer: [B, H, K] softmax row of the last query, fp32}

    ``image_keys`` [B, K] marks image-token keys over the full (padded) sequence, K being
    the key length of the steered forward (prefix cache included).
    """

    image_keys: torch.Tensor
    interventions: list[Intervention] = field(default_factory=list)
    record: bool = True
    records: dict[int, torch.Tensor] = field(default_factory=dict)
    hooks: dict[str, list[Hook]] = field(default_factory=dict)
    _token: contextvars.Token | None = None

    def add_hook(self, point: str, fn: Hook) -> "Steerer":
        """Add ``fn(layer, row, steerer)`` at ``"attn.logits"`` or ``"attn.pattern"``.

        A hook may return a replacement tensor (logits hooks) or None (read only).
        """
        if point not in HOOK_POINTS:
            raise ValueError(f"unknown hook point {point!r}; choose one of {HOOK_POINTS}")
        self.hooks.setdefault(point, []).append(fn)
        return self

    def __enter__(self) -> "Steerer":
        register_attention()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None

    # -- called from the attention function -------------------------------------------
    def wants(self, layer: int) -> bool:
        return (self.record or bool(self.hooks)
                or any(iv.applies(layer) for iv in self.interventions))

    def edits(self, layer: int) -> bool:
        return bool(self.hooks.get("attn.logits")) or any(iv.applies(layer) for iv in self.interventions)

    def steer_logits(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        keys = self.image_keys.to(logits.device)
        if keys.shape[-1] != logits.shape[-1]:
            raise ValueError(f"image key mask covers {keys.shape[-1]} keys but layer {layer} "
                             f"attends over {logits.shape[-1]}")
        for iv in self.interventions:
            if iv.applies(layer):
                logits = iv.apply(logits, keys)
        for fn in self.hooks.get("attn.logits", ()):
            out = fn(layer, logits, self)
            logits = logits if out is None else out
        return logits

    def see_pattern(self, layer: int, probs: torch.Tensor) -> None:
        if self.record:
            self.records[layer] = probs.detach()
        for fn in self.hooks.get("attn.pattern", ()):
            fn(layer, probs, self)


def last_row_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-softmax logits of the last query over all keys, fp32, GQA without repeat_kv.

    ``query`` [B, H, Q, D], ``key`` [B, Hkv, K, D] -> [B, H, K].
    """
    b, h, _, d = query.shape
    hkv = key.shape[1]
    q = query[:, :, -1, :].float().reshape(b, hkv, h // hkv, d)
    logits = torch.matmul(q, key.float().transpose(-1, -2))  # [B, Hkv, rep, K]
    return logits.reshape(b, h, -1) * scaling


def _mask_row(attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :]
    if row.shape[0] != batch:
        row = row.expand(batch, -1)
    return row


def vislens_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The registered attention function: SDPA, plus steering of the last query's row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    steerer = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    active = steerer is not None and layer is not None and steerer.wants(layer)
    if not active:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    edits = steerer.edits(layer)
    q_len = query.shape[2]
    out = None
    if q_len > 1 or not edits:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        scaling=scaling, dropout=dropout, **kwargs)
    logits = last_row_logits(query, key, scaling)
    if edits:
        logits = steerer.steer_logits(layer, logits)
    mask = _mask_row(attention_mask, logits.shape[0])
    if mask is not None:
        mask = mask.to(logits.device)
        logits = logits.masked_fill(~mask[:, None, :], float("-inf")) if mask.dtype == torch.bool \
            else logits + mask[:, None, :].float()
    probs = torch.softmax(logits, dim=-1)
    steerer.see_pattern(layer, probs)
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
                      heads: Iterable[int] | None = None) -> list[Intervention]:
    """One :class:`Intervention` from per-row values (empty list for identity)."""
    v = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values,
                        dtype=torch.float32)
    iv = Intervention(kind, v, frozenset(layers) if layers is not None else None,
                      tuple(heads) if heads is not None else None)
    return [] if iv.is_identity() else [iv]
