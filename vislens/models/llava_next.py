"""LLaVA-1.6 / NeXT (``LlavaNextForConditionalGeneration``): base grid plus anyres tiles.

The exact order of NeXT's image tokens (base grid, then the unpadded high-resolution canvas
row by row with an image-newline token after each row) is recovered by passing coordinate
"features" through the model's own ``pack_image_features``, so vislens never re-implements
the packing and stays right if transformers changes it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import VislensError
from .base import VLMAdapter, register_adapter
from .layout import ImageLayout


@register_adapter("llava_next", "LlavaNextForConditionalGeneration")
class LlavaNextAdapter(VLMAdapter):
    family = "llava_next"

    def _pack(self):
        inner = getattr(self.model, "model", self.model)
        return inner.pack_image_features if hasattr(inner, "pack_image_features") \
            else self.model.pack_image_features

    def layouts(self, input_ids, image_keys, vision, sizes):
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        vc = self.config.vision_config
        g = int(vc.image_size // vc.patch_size)
        crop = int(vc.image_size)
        pinpoints = self.config.image_grid_pinpoints
        strategy = self.config.vision_feature_select_strategy
        image_sizes = vision["image_sizes"]
        out = []
        for i, (w, h) in enumerate(sizes):
            hh, ww = (int(v) for v in image_sizes[i].tolist())
            nph, npw = get_anyres_image_grid_shape((hh, ww), pinpoints, crop)
            feats = torch.full((1 + nph * npw, g * g, 3), 0.0)
            r, c = np.divmod(np.arange(g * g), g)
            feats[0, :, 0] = 0.0
            feats[0, :, 1] = torch.as_tensor(r, dtype=torch.float32)
            feats[0, :, 2] = torch.as_tensor(c, dtype=torch.float32)
            for t in range(nph * npw):
                tr, tc = divmod(t, npw)
                feats[1 + t, :, 0] = 1.0
                feats[1 + t, :, 1] = torch.as_tensor(tr * g + r, dtype=torch.float32)
                feats[1 + t, :, 2] = torch.as_tensor(tc * g + c, dtype=torch.float32)
            packed, _ = self._pack()([feats], image_sizes[i:i + 1].cpu(), strategy,
                                     image_newline=torch.tensor([-1.0, -1.0, -1.0]))
            coords = packed[0].numpy()
            pos = self._positions(image_keys, i)
            if len(pos) != len(coords):
                raise VislensError(f"sample {i} has {len(pos)} image tokens but NeXT packs "
                                   f"{len(coords)} features")
            rects, kinds = _next_rects(coords, g, (nph * crop, npw * crop), (w, h), crop)
            out.append(ImageLayout(pos, rects, (w, h), kinds))
        return out


def _canvas_placement(size: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(new_w, new_h, paste_x, paste_y)``: where NeXT's processor puts a ``size = (W, H)``
    image on its ``canvas_hw`` canvas, in its own integer arithmetic (transformers'
    ``get_patch_output_size``: the fitting side fills the canvas, the other is
    ``ceil(side * scale)``; ``_get_padding_size``: the image is pasted at ``(canvas - new) // 2``)."""
    w, h = size
    ch, cw = canvas_hw
    scale_w, scale_h = cw / w, ch / h
    if scale_w < scale_h:
        new_w, new_h = cw, min(math.ceil(h * scale_w), ch)
    else:
        new_w, new_h = min(math.ceil(w * scale_h), cw), ch
    return new_w, new_h, (cw - new_w) // 2, (ch - new_h) // 2


def _next_rects(coords: np.ndarray, g: int, canvas_hw: tuple[int, int], size: tuple[int, int],
                crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rectangles of base tokens (the whole image, stretched) and canvas tokens (letterboxed)."""
    w, h = size
    new_w, new_h, pad_x, pad_y = _canvas_placement(size, canvas_hw)
    p = crop / g  # canvas pixels per feature
    rects = np.full((len(coords), 4), np.nan)
    kinds = np.empty(len(coords), dtype=object)
    for j, (kind, r, c) in enumerate(np.asarray(coords, dtype=np.float64)):
        if kind < 0:
            kinds[j] = "newline"
        elif kind == 0:
            kinds[j] = "base"
            rects[j] = [c / g, r / g, (c + 1) / g, (r + 1) / g]
        else:
            kinds[j] = "tile"
            x0, x1 = (c * p - pad_x) / new_w, ((c + 1) * p - pad_x) / new_w
            y0, y1 = (r * p - pad_y) / new_h, ((r + 1) * p - pad_y) / new_h
            rects[j] = [max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)]
            if rects[j, 2] <= rects[j, 0] or rects[j, 3] <= rects[j, 1]:
                rects[j] = np.nan
    return rects, kinds.astype(str)
