"""Attention over a prefix cache shared by groups of rows, without repeating it.

The decoding engine runs K steering settings of a batch as one B x K batch (row ``i*K + k``
is sample ``i`` under setting ``k``). All K rows of a sample share the KV cache of the first
``n-1`` prompt tokens; they differ only from the last prompt token on. Repeating the prefix
K times (``batch_repeat_interleave``) would copy it, and every decode step would re-append
to the K copies and read them all.

:func:`fork` instead builds a cache whose layers keep only each row's own *suffix* (the last
prompt token and the generated ones) and point at the original prefix. While a fork is armed
(:func:`armed`), the ``"vislens"`` attention function (:mod:`vislens.steering`) computes a
single query's attention as one softmax over ``[prefix keys, suffix keys]``: the logits of the
K rows of a sample against their prefix come from one matmul on the un-repeated prefix,
those against the suffix from each row's own keys. This is the same arithmetic as attention
over the repeated cache (not an approximation): fp32 logits, softmax and weighted values, as
the steered row is computed anyway.

A fork refuses to be read by any other attention function: :meth:`SharedPrefixCache.check`
raises when a layer's keys were handed out but never attended through the shared path.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_ARMED: contextvars.ContextVar["SharedPrefixCache | None"] = contextvars.ContextVar(
    "vislens_shared_prefix", default=None)


class SharedPrefixLayer(DynamicLayer):
    """One layer's cache: a prefix [B, Hkv, n, D] shared by ``group`` consecutive rows, plus
    each row's own suffix [B*group, Hkv, s, D] (what :meth:`update` appends and returns)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, group: int) -> None:
        super().__init__()
        # fp32 once per pass, keys transposed for the q.k matmul: one copy of the prefix (2x
        # its size in bf16) instead of a conversion at every step (K repeats cost K x)
        self.prefix_keys_t = keys.float().transpose(-1, -2).contiguous()  # [B, Hkv, D, n]
        self.prefix_values, self.group = values.float(), group
        self.pending = False  # a suffix was handed out and not yet attended to here

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.pending = True
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.prefix_values.shape[-2] + super().get_seq_length()

    # -- the attention over [prefix, suffix] for one query per row ----------------------
    # Internally rows are grouped per sample: [B, Hkv, group, rep, keys], so that the group's
    # queries are extra rows of one matmul against the sample's un-repeated prefix.
    def _grouped_logits(self, query: torch.Tensor, key: torch.Tensor, scaling: float
                        ) -> torch.Tensor:
        self.pending = False
        b, hkv, d, n = self.prefix_keys_t.shape
        r, h = query.shape[:2]
        if r != b * self.group:
            raise RuntimeError(f"shared prefix of {b} rows x {self.group} settings got {r} rows")
        g, rep, s = self.group, h // hkv, key.shape[-2]
        q = query[:, :, -1, :].float().reshape(b, g, hkv, rep, d).transpose(1, 2)  # [B,Hkv,g,rep,D]
        lp = torch.matmul(q.reshape(b, hkv, g * rep, d), self.prefix_keys_t)
        ks = key.float().reshape(b, g, hkv, s, d).transpose(1, 2)  # [B, Hkv, g, s, D]
        ls = torch.matmul(q, ks.transpose(-1, -2))  # [B, Hkv, g, rep, s]
        return torch.cat([lp.reshape(b, hkv, g, rep, n), ls], dim=-1) * scaling

    def _grouped_output(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        pv = self.prefix_values
        b, hkv, n, d = pv.shape
        g, rep, s = probs.shape[2], probs.shape[3], value.shape[-2]
        op = torch.matmul(probs[..., :n].reshape(b, hkv, g * rep, n), pv)
        vs = value.float().reshape(b, g, hkv, s, d).transpose(1, 2)  # [B, Hkv, g, s, D]
        out = op.reshape(b, hkv, g, rep, d) + torch.matmul(probs[..., n:], vs)
        return out.transpose(1, 2).reshape(b * g, 1, hkv * rep, d).to(value.dtype)

    def logits(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """Pre-softmax fp32 logits of the last query over prefix then suffix keys.

        ``query`` [R, H, Q, D] (R = B*group), ``key`` the suffix [R, Hkv, s, D] -> [R, H, n+s].
        """
        lg = self._grouped_logits(query, key, scaling)
        return lg.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)

    def output(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``probs`` [R, H, n+s] fp32 (prefix then suffix), ``value`` the suffix
        [R, Hkv, s, D] -> attention output [R, 1, H, D] in the value dtype."""
        b, hkv = self.prefix_values.shape[:2]
        r, h, k = probs.shape
        grouped = probs.reshape(b, self.group, hkv, h // hkv, k).transpose(1, 2)
        return self._grouped_output(grouped, value)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Unsteered attention of one query per row (``mask`` [R, n+s] bool or additive):
        :meth:`logits`, mask, softmax and :meth:`output`, without leaving the grouped layout."""
        lg = self._grouped_logits(query, key, scaling)  # [B, Hkv, g, rep, n+s]
        if mask is not None:
            b, _, g = lg.shape[:3]
            m = mask.to(lg.device).reshape(b, 1, g, 1, -1)
            lg = lg.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else lg + m.float()
        return self._grouped_output(torch.softmax(lg, dim=-1), value)


class SharedPrefixCache(DynamicCache):
    """A cache for B x ``group`` rows over the prefix of a B-row cache (see the module)."""

    def __init__(self, prefix: DynamicCache, group: int) -> None:
        layers = [SharedPrefixLayer(layer.keys, layer.values, group) for layer in prefix.layers]
        super().__init__()
        self.layers, self.layer_class_to_replicate = layers, None

    def layer(self, idx: int | None) -> SharedPrefixLayer | None:
        return self.layers[idx] if idx is not None and 0 <= idx < len(self.layers) else None

    def check(self) -> None:
        """Raise unless every suffix handed out was attended through the shared path."""
        bad = [i for i, layer in enumerate(self.layers) if layer.pending]
        if bad:
            raise RuntimeError(f"layers {bad} attended to a shared-prefix cache without the "
                               "'vislens' attention; the language model must use it")


def eligible(prefix: object) -> bool:
    """Whether ``prefix`` is a plain, filled :class:`DynamicCache` a fork can share."""
    return type(prefix) is DynamicCache and bool(prefix.layers) and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in prefix.layers)


def fork(prefix: DynamicCache, group: int) -> SharedPrefixCache:
    """A cache for ``group`` rows per row of ``prefix`` (left unchanged), suffixes empty."""
    if not eligible(prefix):
        raise TypeError(f"a shared prefix needs a filled DynamicCache of DynamicLayers, got {prefix!r}")
    return SharedPrefixCache(prefix, group)


@contextlib.contextmanager
def armed(cache: SharedPrefixCache) -> Iterator[SharedPrefixCache]:
    """Let the ``"vislens"`` attention read ``cache``'s prefix in the forwards inside."""
    token = _ARMED.set(cache)
    try:
        yield cache
    finally:
        _ARMED.reset(token)
    cache.check()


def shared_layer(layer: int | None) -> SharedPrefixLayer | None:
    """The armed fork's layer ``layer`` (None when no fork is armed)."""
    cache = _ARMED.get()
    return None if cache is None else cache.layer(layer)
