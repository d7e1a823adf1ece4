"""Qwen2-VL and Qwen2.5-VL: a merged patch grid and multimodal RoPE positions."""
from __future__ import annotations

import numpy as np

from ..errors import VislensError
from .base import VLMAdapter, register_adapter
from .layout import ImageLayout, grid_rects


@register_adapter("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
@register_adapter("qwen2_vl", "Qwen2VLForConditionalGeneration")
class Qwen2VLAdapter(VLMAdapter):
    """Image token k sits at ``divmod(k, w // merge)`` on the ``(h/merge) x (w/merge)`` grid.

    The processor resizes the whole image (no crop) to multiples of the patch size, so the
    merged grid covers the full original image.
    """

    family = "qwen2_vl"
    default_template = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                        "{question}<|im_end|>\n<|im_start|>assistant\n")

    def answer_prefix(self) -> str:
        return ""

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def _inner(self):
        return getattr(self.model, "model", self.model)

    def position_ids(self, input_ids, attention_mask, vision):
        """M-RoPE positions [3, B, n] from the model's own ``get_rope_index``."""
        kwargs = dict(image_grid_thw=vision.get("image_grid_thw"), attention_mask=attention_mask)
        if "mm_token_type_ids" in vision:
            kwargs["mm_token_type_ids"] = vision["mm_token_type_ids"]
        pos, _ = self._inner().get_rope_index(input_ids, **kwargs)
        return pos

    def next_position(self, position_ids, steps):
        nxt = position_ids.amax(dim=(0, -1), keepdim=True) + 1 + steps  # [1, B, 1]
        return nxt.expand(position_ids.shape[0], -1, -1)

    def layouts(self, input_ids, image_keys, vision, sizes):
        thw = vision["image_grid_thw"]
        out = []
        for i, (w, h) in enumerate(sizes):
            t, gh, gw = (int(v) for v in thw[i].tolist())
            rows, cols = gh // self.merge, gw // self.merge
            pos = self._positions(image_keys, i)
            if len(pos) != t * rows * cols:
                raise VislensError(f"sample {i} has {len(pos)} image tokens; grid {t}x{gh}x{gw} "
                                   f"expects {t * rows * cols}")
            rects = np.tile(grid_rects(rows, cols), (t, 1))
            out.append(ImageLayout(pos, rects, (w, h), np.full(len(pos), "patch")))
        return out
