"""An independent eager reference of answer-row steering, shared by the steering tests.

The reference computes the full attention matrix of every layer, edits the last row's
image-key logits before the mask (as the paper's modified eager attention does: ScalingVis
multiplies them by alpha; knockout sets them to -inf), and reads the last row. vislens runs
SDPA plus a recomputed last row on a prefix cache, so agreement is a real check.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from conftest import random_image

#: edit(last_row_logits [B, H, K], image_keys [B, K], layer) -> edited logits
Edit = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def scale_edit(alpha: Sequence[float]) -> Edit:
    a = torch.as_tensor(alpha, dtype=torch.float32)

    def edit(last, image_keys, layer):
        return torch.where(image_keys[:, None, :], last * a.to(last.dtype)[:, None, None], last)
    return edit


def knockout_edit(layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Edit:
    def edit(last, image_keys, layer):
        if layers is not None and layer not in layers:
            return last
        sel = image_keys[:, None, :].expand(-1, last.shape[1], -1).clone()
        if heads is not None:
            keep = torch.ones(last.shape[1], dtype=torch.bool)
            keep[list(heads)] = False
            sel[:, keep, :] = False
        return last.masked_fill(sel, float("-inf"))
    return edit


class EagerReference:
    """Plain full-matrix eager attention with an edit of the last row's image-key logits."""

    name = "vislens_test_eager_ref"

    def __init__(self, edit: Edit | None, image_keys: torch.Tensor):
        self.edit = edit
        self.image_keys = image_keys  # [B, K]
        self.rows: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        w = torch.matmul(query, k.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
        if self.edit is not None:
            w = w.clone()
            w[:, :, -1, :] = self.edit(w[:, :, -1, :], self.image_keys, module.layer_idx)
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


def reference_forward(adapter, batch, edit: Edit | Sequence[float] | None, *, positions=True):
    """Full-sequence eager forward; returns (last logits [B, V], rows {layer: [B, H, K]}).

    ``edit`` is an :data:`Edit`, per-row ScalingVis alphas, or None (unsteered).
    """
    if edit is not None and not callable(edit):
        edit = scale_edit(edit)
    ref = EagerReference(edit, batch.image_keys)
    ref.register()
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


def assert_close(actual, expected, rel: float = 1e-4) -> None:
    """Equal up to ``rel`` times the largest magnitude of ``expected``: a relative tolerance
    for values computed by different kernels (eager vs SDPA, AVX2 vs AVX-512, ...)."""
    a = np.asarray(actual.detach().float() if isinstance(actual, torch.Tensor) else actual, np.float64)
    e = np.asarray(expected.detach().float() if isinstance(expected, torch.Tensor) else expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.abs(e).max()), np.finfo(np.float32).tiny) if e.size else 1.0
    err = float(np.abs(a - e).max()) if e.size else 0.0
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x max |expected| {scale:.3g}"
