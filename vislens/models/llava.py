"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square grid of patch tokens."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from ..errors import VislensError
from .base import VLMAdapter, register_adapter
from .layout import ImageLayout, grid_rects


def _get(size: Any, key: str):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def clip_view(width: int, height: int, image_processor: Any) -> tuple[float, float, float, float]:
    """The rectangle a CLIP-style processor's output shows, in the original image's
    normalised coordinates: inside [0, 1] for a centre crop, beyond it where padding shows.

    Follows the slow processor's own integer arithmetic: a shortest-edge resize makes the
    long side ``int(size * long / short)`` pixels (truncated), then a centre crop starts at
    ``(resized - crop) // 2``; a fixed (height, width) resize keeps everything (stretched).
    With ``do_pad`` (``LlavaImageProcessor``, the original LLaVA-1.5's "pad" aspect ratio)
    the image is first pasted at ``((M - W) // 2, (M - H) // 2)`` on an ``M = max(W, H)``
    square, so the output shows the whole image plus bands of padding: e.g. a 640 x 427
    image gives y in [-106/427, 534/427].
    :func:`ramp_view` measures the same rectangle on the processor in use (fast ones may
    round differently); this function is its hand-computed reference.
    """
    if getattr(image_processor, "do_pad", False) is True and width != height:
        m = max(int(width), int(height))
        px, py = (m - int(width)) // 2, (m - int(height)) // 2
        u0, v0, u1, v1 = _crop_view(m, m, image_processor)
        return ((u0 * m - px) / width, (v0 * m - py) / height,
                (u1 * m - px) / width, (v1 * m - py) / height)
    return _crop_view(width, height, image_processor)


def _crop_view(width: int, height: int, image_processor: Any) -> tuple[float, float, float, float]:
    """:func:`clip_view` of an image the processor does not pad."""
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    if not getattr(image_processor, "do_center_crop", False) or crop is None:
        return (0.0, 0.0, 1.0, 1.0)
    cw, ch = int(_get(crop, "width")), int(_get(crop, "height"))
    short = _get(size, "shortest_edge") if getattr(image_processor, "do_resize", True) else None
    if short:
        if width <= height:
            rw, rh = int(short), int(short * height / width)
        else:
            rw, rh = int(short * width / height), int(short)
    elif _get(size, "height") and getattr(image_processor, "do_resize", True):
        rw, rh = int(_get(size, "width")), int(_get(size, "height"))
    else:
        rw, rh = int(width), int(height)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    return (max(left, 0) / rw, max(top, 0) / rh, min(left + cw, rw) / rw, min(top + ch, rh) / rh)


_GOLDEN = (np.sqrt(5) - 1) / 2


def _dither(n: int) -> np.ndarray:
    """``n`` well-spread offsets in [0, 1) (golden-ratio sequence), mean about 1/2."""
    return ((np.arange(n) + 0.5) * _GOLDEN) % 1.0


def ramp_view(image_processor: Any, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The rectangle of a ``size = (W, H)`` image that ``image_processor``'s output shows.

    Measured, not assumed: a black and a white image calibrate the processor's rescale
    and normalisation, and one coordinate ramp passes through it (red = 255 x normalised x,
    green = 255 x normalised y; each dithered along the other axis, so averaging across the
    output removes the 8-bit steps). A line fitted to the interior kept columns (rows) gives
    the resized length and crop offset, snapped to whole pixels when they are (they always
    are for transformers' processors). Works for slow (PIL) and fast (torchvision)
    processors alike, whatever their rounding.
    """
    from PIL import Image

    w, h = (int(v) for v in size)
    u = 255 * (np.arange(w) + 0.5) / w
    v = 255 * (np.arange(h) + 0.5) / h
    ramp = np.zeros((h, w, 3))
    ramp[..., 0] = np.floor(u[None, :] + _dither(h)[:, None])
    ramp[..., 1] = np.floor(v[:, None] + _dither(w)[None, :])
    # black and white at the same size: uint8 resampling has a scale-dependent gain
    images = [Image.fromarray(np.full((h, w, 3), level, np.uint8)) for level in (0, 255)]
    images.append(Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8)))
    try:
        pix = image_processor(images=images, return_tensors="np")["pixel_values"]
    except (ValueError, TypeError) as exc:
        raise VislensError(f"cannot measure the image processor's view: "
                           f"{str(exc).splitlines()[0]}") from None
    pix = np.asarray(pix, dtype=np.float64)
    if pix.ndim != 4 or pix.shape[:2] != (3, 3):
        raise VislensError(f"cannot measure the image processor's view: pixel_values has shape "
                           f"{pix.shape}, expected [3, 3, H, W]")
    # output pixels that show the image change between black and white; padding does not
    gain = np.abs(pix[1] - pix[0]).mean(axis=0)  # [H', W']
    content = gain > 0.5 * gain.max() if gain.max() > 1e-12 else np.ones_like(gain, bool)
    cols, rows = content.any(axis=0), content.any(axis=1)
    inner = content & cols[None, :] & rows[:, None]
    lo, hi = (np.array([p[c][inner].mean() for c in range(3)]) for p in pix[:2])  # per channel
    scale = np.where(np.abs(hi - lo) > 1e-12, hi - lo, np.nan)
    coord = (pix[2, :2] - lo[:2, None, None]) / scale[:2, None, None]  # [2, H', W'] in [0, 1]
    coord = np.where(content[None], coord, np.nan)
    with warnings.catch_warnings():  # rows/columns of padding only: NaN, left out of the fit
        warnings.simplefilter("ignore", RuntimeWarning)
        x0, x1 = _fit_axis(np.nanmean(coord[0], axis=0))
        y0, y1 = _fit_axis(np.nanmean(coord[1], axis=1))
    return (x0, y0, x1, y1)


def processor_view(image_processor: Any) -> Callable[[tuple[int, int]], tuple[float, float, float, float]]:
    """The view function of ``image_processor``: ``size -> (x0, y0, x1, y1)``.

    :func:`ramp_view` costs a few processor calls per image size, so it is run on probe
    sizes chosen to expose rounding (odd crop margins, fractional resized lengths, both
    orientations). When it confirms :func:`clip_view`'s arithmetic on all of them (within
    half a resized pixel: rounding variants differ by a whole one, the ramp measures to
    about 0.2), that arithmetic serves every size; otherwise every size is
    measured with :func:`ramp_view`.
    """
    crop = getattr(image_processor, "crop_size", None)
    c = int(_get(crop, "width") or 0) if crop is not None else 0
    c = c if c >= 8 else 48
    short = _get(getattr(image_processor, "size", None), "shortest_edge")
    for size in _probe_sizes(int(short) if short and int(short) >= 8 else c, c):
        want, got = clip_view(*size, image_processor), ramp_view(image_processor, size)
        for axis in (0, 1):
            span = want[axis + 2] - want[axis]
            tol = span / (2 * c) if span > 0 else 1e-6  # half a resized pixel
            if abs(got[axis] - want[axis]) > tol or abs(got[axis + 2] - want[axis + 2]) > tol:
                return lambda size: ramp_view(image_processor, size)
    return lambda size: clip_view(int(size[0]), int(size[1]), image_processor)


def _probe_sizes(s: int, c: int) -> list[tuple[int, int]]:
    """Image sizes whose shortest-edge resize to ``s`` has a fractional long side above .5
    (``int`` vs ``round``) and an odd margin around the ``c``-pixel crop (floor vs round),
    in both orientations, slightly down- and upscaled (where the ramp is most precise)."""
    out = []
    for short in (s + 1, s // 2 + 1):
        long = next((w for w in range(short + 1, short * 3) if
                     (s * w / short) % 1 > 0.5 and (int(s * w / short) - c) % 2 == 1),
                    short * 2 + 1)
        out += [(long, short), (short, long)]
    return out


def _fit_axis(profile: np.ndarray) -> tuple[float, float]:
    """``[lo, hi]`` of the original axis that the ``C`` output pixels of ``profile`` cover.

    Output pixel ``k`` shows the centre of resized pixel ``o + k``, at normalised coordinate
    ``(o + k + 0.5) / R``; the line through the interior pixels (edges are clamped by the
    resampling filter) gives ``R`` and ``o``. NaN entries (padding) are left out of the fit
    and the line is extended over them, so padding shows as a view beyond [0, 1].
    """
    c = len(profile)
    k = np.arange(c)
    shown = np.flatnonzero(np.isfinite(profile))
    first, last = (shown[0], shown[-1] + 1) if shown.size else (0, c)
    n = last - first
    m = max(2, n // 8)
    sel = slice(first + m, last - m) if n - 2 * m >= 2 else slice(first, last)
    if not np.isfinite(profile[sel]).all() or len(k[sel]) < 2:
        raise VislensError("cannot measure the image processor's view: its output does not "
                           "follow the input image's coordinates")
    b, a = np.polyfit(k[sel], profile[sel], 1)
    if b <= 0:
        raise VislensError("cannot measure the image processor's view: its output does not "
                           "follow the input image's coordinates")
    lo, hi = a - b / 2, a + b * (c - 0.5)
    r_int = round(1 / b)
    if abs(1 / b - r_int) < 0.25 * max(1.0, r_int / c):  # whole resized pixels: refit the offset
        offset = float(np.mean(profile[sel] * r_int - k[sel])) - 0.5
        o_int = round(offset)
        if abs(offset - o_int) < 0.25:
            lo, hi = o_int / r_int, (o_int + c) / r_int
    if shown.size == c:  # no padding: the output lies within the image
        return float(np.clip(lo, 0.0, 1.0)), float(np.clip(hi, 0.0, 1.0))
    return float(lo), float(hi)


@register_adapter("llava", "LlavaForConditionalGeneration")
class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: ``(image_size/patch)^2`` tokens (24x24 = 576), contiguous, row-major."""

    family = "llava"

    @property
    def patch_grid(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size // vc.patch_size)

    def processor_rect(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The rectangle the processor's output shows (:func:`processor_view`: measured by
        ramp images through the processor in use), beyond [0, 1] where it pads; cached per
        size."""
        size = (int(size[0]), int(size[1]))
        cache = self.__dict__.setdefault("_views", {})
        if size not in cache:
            if "_view_of" not in self.__dict__:
                self._view_of = processor_view(self.processor.image_processor)
            cache[size] = tuple(float(v) for v in self._view_of(size))
        return cache[size]

    def image_view(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The part of the image the model sees: the processor's centre crop (the whole
        image when it pads to a square)."""
        x0, y0, x1, y1 = self.processor_rect(size)
        return (max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0))

    def layouts(self, input_ids, image_keys, vision, sizes):
        g = self.patch_grid
        out = []
        for i, (w, h) in enumerate(sizes):
            pos = self._positions(image_keys, i)
            if len(pos) != g * g:
                raise VislensError(f"sample {i} has {len(pos)} image tokens; LLaVA expects {g * g}")
            # tokens over padding see no image (NaN, like NeXT's); edge tokens keep their
            # image part
            rects = grid_rects(g, g, self.processor_rect((w, h)))
            clipped = np.clip(rects, 0.0, 1.0)
            empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
            clipped[empty] = np.nan
            out.append(ImageLayout(pos, clipped, (w, h), np.full(g * g, "patch")))
        return out
