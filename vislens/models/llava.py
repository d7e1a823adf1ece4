"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square grid of patch tokens."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import VislensError
from .base import VLMAdapter, register_adapter
from .layout import ImageLayout, grid_rects


def _get(size: Any, key: str):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def clip_view(width: int, height: int, image_processor: Any) -> tuple[float, float, float, float]:
    """The part of the original image a CLIP-style processor keeps, normalised to [0, 1].

    Shortest-edge resize followed by a center crop keeps a central square of a non-square
    image; a fixed (height, width) resize keeps everything (stretched).
    """
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    if not getattr(image_processor, "do_center_crop", False) or crop is None:
        return (0.0, 0.0, 1.0, 1.0)
    cw, ch = _get(crop, "width"), _get(crop, "height")
    short = _get(size, "shortest_edge") if getattr(image_processor, "do_resize", True) else None
    if short:
        scale = short / min(width, height)
    elif _get(size, "height"):
        return (0.0, 0.0, 1.0, 1.0) if (_get(size, "height"), _get(size, "width")) == (ch, cw) \
            else _crop_box(width, height, _get(size, "width") / width, cw, ch, _get(size, "height") / height)
    else:
        scale = 1.0
    return _crop_box(width, height, scale, cw, ch, scale)


def _crop_box(width, height, sx, cw, ch, sy):
    rw, rh = width * sx, height * sy
    left, top = max((rw - cw) / 2, 0.0), max((rh - ch) / 2, 0.0)
    x0, y0 = left / sx / width, top / sy / height
    x1, y1 = min((left + cw) / sx / width, 1.0), min((top + ch) / sy / height, 1.0)
    return (x0, y0, x1, y1)


@register_adapter("llava", "LlavaForConditionalGeneration")
class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: ``(image_size/patch)^2`` tokens (24x24 = 576), contiguous, row-major."""

    family = "llava"

    @property
    def patch_grid(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size // vc.patch_size)

    def layouts(self, input_ids, image_keys, vision, sizes):
        g = self.patch_grid
        out = []
        for i, (w, h) in enumerate(sizes):
            pos = self._positions(image_keys, i)
            if len(pos) != g * g:
                raise VislensError(f"sample {i} has {len(pos)} image tokens; LLaVA expects {g * g}")
            rects = grid_rects(g, g, clip_view(w, h, self.processor.image_processor))
            out.append(ImageLayout(pos, rects, (w, h), np.full(g * g, "patch")))
        return out
