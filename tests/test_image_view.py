"""What the model sees: the processor's view (measured by a ramp image) restricts box masks.

Issue 13 item 8: object area outside LLaVA-1.5's centre crop must not count against the
overlap, and the crop follows the processor's own integer arithmetic.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from vislens.boxes import box_mask
from vislens.errors import VislensError
from vislens.metrics import overlap
from vislens.models.layout import ImageLayout, grid_rects
from vislens.models.llava import clip_view, ramp_view

# 56 x 40 image, shortest edge and crop 48: resized int(48 * 56 / 40) = 67 columns (not 67.2),
# crop offset (67 - 48) // 2 = 9 (not 9.6): the view is x in [9/67, 57/67]
W, H, S = 56, 40, 48
VIEW = (9 / 67, 0.0, 57 / 67, 1.0)


def _processors():
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    kw = dict(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    return CLIPImageProcessorPil(**kw), CLIPImageProcessor(**kw)


def test_ramp_view_equals_the_processors_integer_arithmetic():
    slow, fast = _processors()
    assert clip_view(W, H, slow) == pytest.approx(VIEW, rel=1e-12)
    for proc in (slow, fast):
        assert ramp_view(proc, (W, H)) == pytest.approx(VIEW, rel=1e-9)
        assert ramp_view(proc, (H, W)) == pytest.approx((0.0, 9 / 67, 1.0, 57 / 67), rel=1e-9)
    # continuous arithmetic (the former view) would start at 9.6 / 67.2: 0.2 of a 24-grid cell off
    assert (9.6 / 67.2 - VIEW[0]) * 24 == pytest.approx(96 / 469, rel=1e-9)  # (1/7 - 9/67) x 24
    # the left edge of the first kept column is x = 9 * 56 / 67 = 7.52 original pixels; a plain
    # ramp (pixel value = column index) shows that column's centre at 9.5 * 56 / 67 - 0.5 = 7.44
    from PIL import Image

    col = np.tile(np.arange(W, dtype=np.uint8), (H, 1))
    plain = type(slow)(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                       do_normalize=False, do_rescale=False)
    pix = np.asarray(plain(images=[Image.fromarray(np.stack([col] * 3, -1))],
                           return_tensors="np")["pixel_values"], dtype=float)
    assert pix[0, 0, H // 2, 0] == pytest.approx(9.5 * 56 / 67 - 0.5, abs=0.6)


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (101, 77), (48, 48), (300, 97)])
def test_ramp_view_matches_hand_arithmetic_on_other_sizes(size):
    slow, fast = _processors()
    want = np.array(clip_view(*size, slow))
    pixel = np.tile((want[2:] - want[:2]) / S, 2)  # one resized pixel, per axis, normalised
    for proc in (slow, fast):  # within a quarter of a resized pixel (8-bit ramps, resampling)
        assert (np.abs(np.array(ramp_view(proc, size)) - want) <= 0.25 * pixel).all()


class CeilCrop:
    """A processor that claims CLIP's settings but centre-crops at ceil((R - C) / 2)."""

    size, crop_size = {"shortest_edge": S}, {"height": S, "width": S}
    do_center_crop = do_resize = True

    def __init__(self):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        self.inner = CLIPImageProcessorPil(size=self.size, do_center_crop=False)

    def __call__(self, images, return_tensors):
        out = []
        for im in images:
            pix = self.inner(images=[im], return_tensors="np")["pixel_values"][0]
            top, left = (-((S - n) // 2) for n in pix.shape[1:])  # ceil of (n - S) / 2
            out.append(pix[:, top:top + S, left:left + S])
        return {"pixel_values": np.stack(out)}


def test_processor_view_uses_arithmetic_only_where_ramps_confirm_it():
    from vislens.models.llava import processor_view

    slow, fast = _processors()
    for proc in (slow, fast):  # transformers' processors follow the int()/floor arithmetic
        view_of = processor_view(proc)
        for size in [(W, H), (640, 480), (333, 500)]:
            assert view_of(size) == clip_view(*size, proc)
    other = type(slow)(size={"shortest_edge": 64}, crop_size={"height": S, "width": S})
    assert processor_view(other)((W, H)) == clip_view(W, H, other)  # resize 64, crop 48
    odd = CeilCrop()
    view_of = processor_view(odd)
    # 56 x 40: 67 resized columns, this processor crops at 10 (not 9): measured, not assumed
    assert view_of((W, H)) == pytest.approx((10 / 67, 0.0, 58 / 67, 1.0), rel=1e-9)
    assert clip_view(W, H, odd) == pytest.approx(VIEW)


def test_ramp_view_refuses_a_processor_it_cannot_read():
    class Flat:
        def __call__(self, images, return_tensors):
            return {"pixel_values": np.zeros((len(images), 3, 4, 4))}

    with pytest.raises(VislensError, match="view"):
        ramp_view(Flat(), (8, 8))


def test_box_half_outside_the_crop_counts_only_its_visible_half():
    # 56 x 40 image on a 4 x 4 grid (cells 0.25 wide); box x in [0, 28] px = [0, 0.5],
    # y in [0, 20] px = [0, 0.5]; the model sees x >= 9/67
    mask = box_mask([[0, 0, 28, 20]], (W, H), 4, view=VIEW)
    want = np.zeros((4, 4))
    want[:2, 0] = (0.25 - 9 / 67) * 4  # = 31/67 of column 0 is both box and seen
    want[:2, 1] = 1.0
    np.testing.assert_allclose(mask, want, rtol=1e-6)
    np.testing.assert_allclose(box_mask([[0, 0, 28, 20]], (W, H), 4)[:2, :2], 1.0)  # unrestricted
    # a box ending inside the straddling cell: clipped exactly, not box fraction x visible fraction
    thin = box_mask([[0, 0, 0.2 * W, 20]], (W, H), 4, view=VIEW)
    assert thin[0, 0] == pytest.approx((0.2 - 9 / 67) * 4, rel=1e-6)
    assert thin[0, 0] != pytest.approx(0.8 * (0.25 - 9 / 67) * 4, rel=1e-2)
    # a box wholly outside the view gives an empty mask
    assert box_mask([[0, 0, 5, 20]], (W, H), 4, view=VIEW).sum() == 0
    with pytest.raises(VislensError, match="view"):
        box_mask([[0, 0, 5, 5]], (W, H), 4, view=(0.5, 0, 0.2, 1))


def test_overlap_with_a_restricted_mask_equals_plain_numpy():
    g, G = 8, 12
    layout = ImageLayout(np.arange(g * g), grid_rects(g, g, VIEW), (W, H), np.full(g * g, "patch"))
    assert layout.view == pytest.approx(VIEW)
    rng = np.random.default_rng(0)
    attn = layout.to_grid(rng.random((3, g * g)), G)  # [3, G, G]
    box = [[0, 4, 30, 36]]  # sticks out of the crop on the left
    mask = box_mask(box, (W, H), G, view=layout.view)
    # plain numpy: sample the box-and-view indicator on a fine grid, average per cell
    n = 240
    xs, ys = (np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n
    inside = ((ys[:, None] * H >= 4) & (ys[:, None] * H < 36)) & \
        ((xs[None] * W < 30) & (xs[None] >= VIEW[0]) & (xs[None] < VIEW[2]))
    ref_mask = inside.reshape(G, n // G, G, n // G).mean(axis=(1, 3))
    np.testing.assert_allclose(mask, ref_mask, atol=1 / (n // G))  # sampling error per cell
    a, m = attn.reshape(3, -1), mask.reshape(-1).astype(np.float64)
    ref = a @ m / (np.linalg.norm(a, axis=1) * np.linalg.norm(m))
    np.testing.assert_allclose(overlap(attn, mask), ref, rtol=1e-5)
    # attention spread evenly over the seen part of the object overlaps it perfectly only
    # with the restricted mask
    assert overlap(mask.astype(np.float64), mask) == pytest.approx(1.0, rel=1e-6)
    assert overlap(mask.astype(np.float64), box_mask(box, (W, H), G)) < 0.95


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl"])
def test_adapter_image_view_is_the_layouts_bounding_box(tiny_adapter, arch):
    from tests.conftest import random_image

    adapter = tiny_adapter(arch)
    lay = adapter.prepare([random_image(3, (W, H))], ["Where is the cat?"]).layouts[0]
    assert lay.view == pytest.approx(adapter.image_view((W, H)), abs=1e-9)
    if arch == "llava":  # the tiny LLaVA's processor: shortest edge and crop 48
        assert adapter.image_view((W, H)) == pytest.approx(VIEW, rel=1e-9)
    else:
        assert adapter.image_view((W, H)) == (0.0, 0.0, 1.0, 1.0)


def _wide_jsonl(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    rows = []
    for k in range(2):
        Image.fromarray(np.full((H, W, 3), 40 * k, np.uint8)).save(tmp_path / f"images/{k}.png")
        rows.append({"id": f"w{k}", "image": f"images/{k}.png",
                     "question": "Where is the cup in relation to the plate? Answer with left or right.",
                     "options": ["left", "right"], "answer": "left", "objects": ["cup", "plate"],
                     "boxes": [{"label": "cup", "xyxy": [0, 0, 28, 20]},
                               {"label": "plate", "xyxy": [40, 20, 56, 40]}]})
    path = tmp_path / "wide.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_capture_stores_the_view_and_restricts_masks(tiny_dir, tmp_path):
    from vislens.boxes import attach_boxes
    from vislens.capture import run_capture
    from vislens.store import open_capture

    data = _wide_jsonl(tmp_path)
    out = run_capture(model=str(tiny_dir("llava")), dataset=f"jsonl:{data}", out=tmp_path / "c.h5",
                      conditions=["baseline"], max_new_tokens=1, device="cpu", progress=False,
                      log=lambda m: None).path
    boxes = [[0, 0, 28, 20], [40, 20, 56, 40]]
    want = box_mask(boxes, (W, H), 24, view=VIEW)
    assert want.sum() < box_mask(boxes, (W, H), 24).sum() - 1  # the crop hides box area
    with open_capture(out) as c:
        np.testing.assert_allclose(c.views(), np.tile(VIEW, (2, 1)), rtol=1e-6)
        for i in range(2):
            np.testing.assert_allclose(c.box_mask()[i], want, rtol=1e-5, atol=1e-7)
    # `vislens boxes` (later, without the model) restricts with the stored view too
    attach_boxes(out, "annotations")
    with open_capture(out) as c:
        np.testing.assert_allclose(c.views(), np.tile(VIEW, (2, 1)), rtol=1e-6)
        np.testing.assert_allclose(c.box_mask()[0], want, rtol=1e-5, atol=1e-7)


def test_files_without_a_view_mean_the_whole_image(tiny_dir, tmp_path):
    import h5py

    from vislens.boxes import attach_boxes
    from vislens.store import open_capture
    from vislens.store.compact import build_final
    from vislens.store.format import read_attrs

    from vislens.capture import run_capture

    data = _wide_jsonl(tmp_path)
    out = run_capture(model=str(tiny_dir("llava")), dataset=f"jsonl:{data}", out=tmp_path / "c.h5",
                      conditions=["baseline"], max_new_tokens=1, device="cpu", progress=False,
                      log=lambda m: None).path
    with h5py.File(out, "r+") as f:  # as an older vislens wrote it
        del f["samples/view"]
    with open_capture(out) as c:
        np.testing.assert_array_equal(c.views(), np.tile([0, 0, 1, 1], (2, 1)))
    attach_boxes(out, "annotations")
    with open_capture(out) as c:
        assert "view" not in c._f["samples"]
        np.testing.assert_allclose(c.box_mask()[1], box_mask([[0, 0, 28, 20], [40, 20, 56, 40]],
                                                             (W, H), 24), rtol=1e-6)
    # a final file built from an old and a new source fills the old rows with the whole image
    new = run_capture(model=str(tiny_dir("llava")), dataset=f"jsonl:{data}",
                      out=tmp_path / "n.h5", conditions=["baseline"], max_new_tokens=1,
                      device="cpu", progress=False, log=lambda m: None).path
    with h5py.File(out, "r") as old_f, h5py.File(new, "r") as new_f:
        build_final(tmp_path / "mix.h5", [old_f, new_f], np.array([0, 1]), np.array([0, 1]),
                    read_attrs(new_f))
    with open_capture(tmp_path / "mix.h5") as c:
        np.testing.assert_allclose(c.views(), [[0, 0, 1, 1], VIEW], rtol=1e-6)


def test_a_processor_that_pads_to_a_square_shows_padding_not_a_stretched_image(tiny_dir):
    """LlavaImageProcessor(do_pad=True) (the original LLaVA-1.5's "pad" aspect ratio) pastes a
    56 x 40 image at y = (56 - 40) // 2 = 8 on a 56 x 56 square: token row r of the 24 x 24
    grid shows y in [(-8 + r * 56 / 24) / 40, (-8 + (r + 1) * 56 / 24) / 40], and the rows
    over the padding see nothing of the image."""
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from tests.conftest import random_image
    from vislens.models import load_model

    kw = dict(do_pad=True, size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    want = (0.0, -8 / 40, 1.0, 48 / 40)
    for proc in (LlavaImageProcessor(**kw), LlavaImageProcessorPil(**kw)):
        assert clip_view(W, H, proc) == pytest.approx(want, rel=1e-12)
        pixel = np.tile((np.array(want[2:]) - want[:2]) / S, 2)  # one output pixel, normalised
        assert (np.abs(np.array(ramp_view(proc, (W, H))) - want) <= 0.25 * pixel).all()

    adapter = load_model(tiny_dir("llava"), dtype="float32", device="cpu")
    adapter.processor.image_processor = LlavaImageProcessor(**kw)
    assert adapter.image_view((W, H)) == (0.0, 0.0, 1.0, 1.0)  # the whole image is seen
    lay = adapter.prepare([random_image(3, (W, H))], ["Where is the cat?"]).layouts[0]
    g = 24
    r, c = np.divmod(np.arange(g * g), g)
    y0, y1 = (-8 + r * 56 / g) / 40, (-8 + (r + 1) * 56 / g) / 40
    ref = np.stack([c / g, np.clip(y0, 0, 1), (c + 1) / g, np.clip(y1, 0, 1)], axis=1)
    ref[(y1 <= 0) | (y0 >= 1)] = np.nan
    np.testing.assert_allclose(lay.rects, ref, rtol=1e-9, atol=1e-12)
    assert np.isnan(lay.rects[:, 0]).sum() == 2 * 3 * g  # 8 px of padding = 3.4 rows each side
