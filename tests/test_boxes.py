"""Object boxes: exact grid coverage, name -> COCO class matching, YOLO and annotation boxes.

Masks are checked against hand-computed coverage and a pixel-count oracle (exact for integer
boxes), and against every adapter's token geometry (LLaVA-1.5 stretch and center crop,
LLaVA-NeXT base + anyres tiles, Qwen2-VL merged grid). The YOLO plumbing runs an untrained
``yolov8n.yaml`` model offline with the network disabled; the matching logic is tested with
a fake detector so it is deterministic.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import vislens.boxes as vb
from vislens.boxes import (COCO_SYNONYMS, Detection, Unmatched, annotation_boxes, box_mask,
                           box_masks, coco_class_for, detect_boxes, match_detections)
from vislens.data.base import Box, Sample
from vislens.errors import VislensError
from vislens.models.layout import ImageLayout, grid_rects
from vislens.models.llava import clip_view
from vislens.models.llava_next import _next_rects

COCO = {0: "person", 1: "bicycle", 15: "cat", 16: "dog", 41: "cup", 56: "chair", 57: "couch",
        60: "dining table", 62: "tv", 63: "laptop", 67: "cell phone", 40: "wine glass",
        52: "hot dog", 54: "donut", 4: "airplane", 3: "motorcycle", 43: "knife", 5: "bus",
        17: "horse", 30: "skis", 76: "scissors"}


@pytest.fixture(scope="module", autouse=True)
def _yolo_config_in_tmp(tmp_path_factory):
    """Keep ultralytics' settings and font out of the home directory during these tests.

    ultralytics reads ``YOLO_CONFIG_DIR`` once, at import; the first test to import it
    (through vislens.boxes) fixes the directory for the session.
    """
    with pytest.MonkeyPatch.context() as mp:
        if "ultralytics" not in sys.modules:
            mp.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-config")))
        mp.setenv("YOLO_OFFLINE", "1")
        yield


def _sample(sid: str, image_path: str | Path, objects, boxes=()) -> Sample:
    return Sample(id=sid, image_path=str(image_path), question="?", options=["yes", "no"],
                  answer="yes", objects=list(objects), boxes=list(boxes))


def _image(path: Path, size=(64, 48), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(path)
    return path


# --------------------------------------------------------------------------- box_mask

def test_box_covering_cells_rows_0_1_cols_0_2_gives_ones_there():
    # 240 x 120 image, G = 24: a cell is 10 x 5 px.
    mask = box_mask(np.array([[0, 0, 30, 10]]), (240, 120), 24)
    expected = np.zeros((24, 24), dtype=np.float32)
    expected[0:2, 0:3] = 1.0
    assert mask.dtype == np.float32 and mask.shape == (24, 24)
    np.testing.assert_array_equal(mask, expected)  # exactly: no slivers in other cells


def test_half_and_quarter_cells():
    half = box_mask([[0, 0, 5, 5]], (240, 120), 24)  # half the width of cell (0, 0)
    assert half[0, 0] == pytest.approx(0.5) and half.sum() == pytest.approx(0.5)
    quarter = box_mask([[5, 2.5, 15, 7.5]], (240, 120), 24)  # centred on a cell corner
    np.testing.assert_allclose(quarter[0:2, 0:2], 0.25)
    assert quarter.sum() == pytest.approx(1.0)


def test_overlapping_boxes_count_once():
    one = box_mask([[0, 0, 20, 5]], (240, 120), 24)
    both = box_mask([[0, 0, 20, 5], [10, 0, 30, 5], [12, 1, 18, 4]], (240, 120), 24)
    np.testing.assert_allclose(both[0, :3], [1.0, 1.0, 1.0])
    assert both.max() <= 1.0 and both.sum() == pytest.approx(3.0)
    assert one.sum() == pytest.approx(2.0)


def test_box_partly_outside_is_clipped_and_outside_box_is_ignored():
    mask = box_mask([[-10, -10, 5, 2.5], [300, 0, 400, 50]], (240, 120), 24)
    assert mask[0, 0] == pytest.approx(0.25) and mask.sum() == pytest.approx(0.25)
    full = box_mask([[-1e6, -1e6, 1e6, 1e6]], (240, 120), 24)
    np.testing.assert_array_equal(full, np.ones((24, 24), dtype=np.float32))


def test_empty_and_degenerate_boxes_give_zeros():
    for boxes in (np.zeros((0, 4)), [], [[10, 10, 10, 20]], [[np.nan, 0, 5, 5]]):
        mask = box_mask(boxes, (50, 40), 6)
        assert mask.shape == (6, 6) and mask.dtype == np.float32 and not mask.any()


def test_matches_pixel_count_for_random_integer_boxes():
    """For boxes on pixel edges the exact coverage is a pixel count: compare to a raster."""
    rng = np.random.default_rng(0)
    w, h, g = 96, 72, 8  # cells of 12 x 9 px
    for _ in range(20):
        m = rng.integers(1, 5)
        x = np.sort(rng.integers(-10, w + 10, (m, 2)), axis=1)
        y = np.sort(rng.integers(-10, h + 10, (m, 2)), axis=1)
        boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
        raster = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            raster[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
        expected = raster.reshape(g, h // g, g, w // g).mean(axis=(1, 3))
        np.testing.assert_allclose(box_mask(boxes, (w, h), g), expected, rtol=1e-6)  # float32 cells vs exact fractions


def test_bad_inputs_raise_vislens_error():
    with pytest.raises(VislensError, match="shape"):
        box_mask(np.zeros((2, 3)), (10, 10), 4)
    with pytest.raises(VislensError, match="image_size"):
        box_mask([[0, 0, 1, 1]], (0, 10), 4)
    with pytest.raises(VislensError, match="visible"):
        box_mask([[0, 0, 1, 1]], (10, 10), 4, visible=np.ones((3, 3)))


def test_box_masks_batches_samples():
    out = box_masks([np.array([[0, 0, 30, 10]]), np.zeros((0, 4))], [(240, 120), (50, 50)], 24,
                    visible=[None, np.ones((24, 24))])
    assert out.shape == (2, 24, 24) and out.dtype == np.float32
    assert out[0].sum() == pytest.approx(6.0) and not out[1].any()
    with pytest.raises(VislensError, match="sizes"):
        box_masks([np.zeros((0, 4))], [(1, 1), (2, 2)])


# --------------------------------------------------------------------------- every layout

def _token_box(layout: ImageLayout, t: int) -> np.ndarray:
    """Pixel box exactly covering token t's rectangle."""
    w, h = layout.image_size
    return (layout.rects[t] * np.array([w, h, w, h]))[None]


def _overlap(layout: ImageLayout, t: int, grid: int, **kw) -> float:
    mask = box_mask(_token_box(layout, t), layout.image_size, grid, **kw)
    return float(mask.ravel() @ layout.projection(grid)[t])


def _llava_layout(size, processor, g=24) -> ImageLayout:
    """As ``LlavaAdapter.layouts``: a g x g patch grid over the processor's view."""
    rects = grid_rects(g, g, clip_view(*size, processor))
    return ImageLayout(np.arange(g * g), rects, size, np.full(g * g, "patch"))


def test_llava_square_resize_layout():
    stretch = SimpleNamespace(do_center_crop=False, size={"height": 336, "width": 336})
    layout = _llava_layout((300, 200), stretch)
    t = 1 * 24 + 1  # token row 1, col 1: [1/24, 2/24]^2 = cells [2/3, 4/3] at G = 16
    mask = box_mask(_token_box(layout, t), layout.image_size, 16)
    np.testing.assert_allclose(mask[0:2, 0:2], 1 / 9, rtol=1e-6)  # 1/3 x 1/3 of each cell
    assert mask.sum() == pytest.approx(4 / 9)
    # the token's mass is split 1/2 x 1/2 over those cells, each 1/9 covered
    assert _overlap(layout, t, 16) == pytest.approx(1 / 9)
    assert _overlap(layout, t, 24) == pytest.approx(1.0)  # token == cell at G = 24
    np.testing.assert_allclose(layout.visible(16), 1.0)


def test_llava_center_crop_layout_and_visible_columns():
    crop = SimpleNamespace(do_center_crop=True, do_resize=True, size={"shortest_edge": 336},
                           crop_size={"height": 336, "width": 336})
    layout = _llava_layout((672, 336), crop)  # keeps x in [0.25, 0.75]
    assert clip_view(672, 336, crop) == pytest.approx((0.25, 0.0, 0.75, 1.0))
    t = 3 * 24 + 0  # row 3, first visible column: x in [0.25, 0.25 + 1/48] = half a cell
    mask = box_mask(_token_box(layout, t), layout.image_size, 24)
    assert mask[3, 6] == pytest.approx(0.5) and mask.sum() == pytest.approx(0.5)
    assert _overlap(layout, t, 24) == pytest.approx(0.5)
    # visible: columns 0..5 and 18..23 are cropped away
    visible = layout.visible(24)
    left_half = box_mask([[0, 0, 336, 336]], (672, 336), 24, visible=visible)
    assert not left_half[:, :6].any() and not left_half[:, 12:].any()
    np.testing.assert_allclose(left_half[:, 6:12], 1.0)
    whole = box_mask([[0, 0, 672, 336]], (672, 336), 24, visible=visible)
    np.testing.assert_allclose(whole, visible)
    assert not whole[:, list(range(6)) + list(range(18, 24))].any()


def test_llava_next_base_and_tile_layout():
    # g = 4 features per tile side, crop = 4 canvas px, a 1 x 2 tile canvas (4 x 8 px).
    # A 300 x 200 image is letterboxed to 6 x 4 px with one padding column each side.
    g, w, h = 4, 300, 200
    coords = [(0, r, c) for r in range(g) for c in range(g)]
    for r in range(g):
        coords += [(1, r, c) for c in range(8)] + [(-1, -1, -1)]
    rects, kinds = _next_rects(np.array(coords, dtype=float), g, (4, 8), (w, h), 4)
    layout = ImageLayout(np.arange(len(coords)) + 5, rects, (w, h), kinds)
    tile = {(r, c): j for j, (k, r, c) in enumerate(coords) if k == 1}
    assert (kinds == "newline").sum() == 4
    assert np.isnan(rects[tile[0, 0]]).all() and np.isnan(rects[tile[0, 7]]).all()  # padding
    t = tile[1, 2]  # x in [1/6, 2/6] -> cells [1.33, 2.67] at G = 8; y in [1/4, 2/4]
    np.testing.assert_allclose(rects[t], [1 / 6, 1 / 4, 2 / 6, 2 / 4])
    mask = box_mask(_token_box(layout, t), (w, h), 8)
    np.testing.assert_allclose(mask[2:4, 1:3], 2 / 3, rtol=1e-6)
    assert mask.sum() == pytest.approx(4 * 2 / 3)
    assert _overlap(layout, t, 8) == pytest.approx(2 / 3)  # 1/4 of the token per cell
    base = 1 * g + 2  # base token row 1, col 2: [0.5, 0.25, 0.75, 0.5] = cells 2..3 x 4..5
    mask = box_mask(_token_box(layout, base), (w, h), 8)
    np.testing.assert_allclose(mask[2:4, 4:6], 1.0)
    assert mask.sum() == pytest.approx(4.0) and _overlap(layout, base, 8) == pytest.approx(1.0)
    np.testing.assert_allclose(layout.visible(8), 1.0)


def test_qwen2_vl_merged_grid_layout():
    rows, cols, w, h = 3, 5, 250, 120  # as Qwen2VLAdapter: grid_rects of the merged grid
    layout = ImageLayout(np.arange(rows * cols), grid_rects(rows, cols), (w, h),
                         np.full(rows * cols, "patch"))
    t = 1 * cols + 2  # x in [0.4, 0.6] = cells [9.6, 14.4]; y in [1/3, 2/3] = cells [8, 16]
    mask = box_mask(_token_box(layout, t), (w, h), 24)
    expected = np.zeros((24, 24))
    expected[8:16, 10:14] = 1.0
    expected[8:16, [9, 14]] = 0.4
    np.testing.assert_allclose(mask, expected, rtol=1e-6)
    # token mass per column: 0.4/4.8 in the edge columns, 1/4.8 inside; rows fully covered
    assert _overlap(layout, t, 24) == pytest.approx((2 * 0.4 * 0.4 + 4 * 1.0) / 4.8)


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("name, cls", [
    ("table", "dining table"), ("desk", "dining table"), ("Dining Table", "dining table"),
    ("television", "tv"), ("monitor", "tv"), ("man", "person"), ("people", "person"),
    ("toddler", "person"), ("the girl", "person"), ("sofa", "couch"), ("sofas", "couch"),
    ("phone", "cell phone"), ("cellphone", "cell phone"), ("bike", "bicycle"),
    ("motorbike", "motorcycle"), ("plane", "airplane"), ("mug", "cup"), ("armchair", "chair"),
    ("wineglass", "wine glass"), ("wine glasses", "wine glass"), ("hotdog", "hot dog"),
    ("hot-dog", "hot dog"), ("doughnut", "donut"), ("laptop", "laptop"), ("cats", "cat"),
    ("black cat", "cat"), ("knives", "knife"), ("buses", "bus"), ("horses", "horse"),
    ("skis", "skis"), ("scissors", "scissors"), ("widget", None), ("red widget", None),
])
def test_coco_class_for(name, cls):
    assert coco_class_for(name, COCO) == cls


def test_synonym_table_points_at_coco_classes():
    names = set(vb.coco_names().values())
    assert len(names) == 80
    assert set(COCO_SYNONYMS.values()) <= names
    assert all(k == k.lower().strip() for k in COCO_SYNONYMS)


def test_match_detections_best_score_distinct_and_reasons():
    xyxy = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 12, 12], [3, 3, 13, 13],
                     [4, 4, 14, 14]], dtype=float)
    scores = np.array([0.4, 0.9, 0.2, 0.8, 0.7])
    classes = np.array([15, 15, 16, 0, 0])
    out = match_detections(["black cat", "dog", "man", "woman", "child", "widget"],
                           xyxy, scores, classes, COCO, conf=0.25)
    assert out[0] == Detection("black cat", "cat", (1.0, 1.0, 11.0, 11.0), 0.9)
    assert out[1] == Unmatched("dog", "no detection of class 'dog' above conf 0.25")
    assert (out[2].xyxy, out[2].score) == ((3.0, 3.0, 13.0, 13.0), 0.8)  # best person
    assert (out[3].xyxy, out[3].score) == ((4.0, 4.0, 14.0, 14.0), 0.7)  # next, not reused
    assert isinstance(out[4], Unmatched) and "left after earlier objects" in out[4].reason
    assert out[5] == Unmatched("widget", "no COCO class for 'widget'")
    empty = match_detections(["cat"], np.zeros((0, 4)), [], [], COCO)
    assert empty == [Unmatched("cat", "no detection of class 'cat' above conf 0")]


# --------------------------------------------------------------------------- fake detector

class _FakeModel:
    """Stands in for ``ultralytics.YOLO``: canned detections keyed by image width."""

    names = COCO

    def __init__(self, outputs):
        self.outputs = outputs
        self.calls = []

    def predict(self, images, **kw):
        self.calls.append((len(images), kw))
        res = []
        for im in images:
            xyxy, conf, cls = self.outputs.get(im.size[0], (np.zeros((0, 4)), [], []))
            boxes = SimpleNamespace(xyxy=np.asarray(xyxy, float), conf=np.asarray(conf, float),
                                    cls=np.asarray(cls, float))
            res.append(SimpleNamespace(boxes=boxes))
        return res


@pytest.fixture
def fake_detector(monkeypatch):
    def install(outputs):
        model = _FakeModel(outputs)
        loads = []
        monkeypatch.setattr(vb, "_load_detector", lambda w: loads.append(w) or model)
        return model, loads
    return install


def test_detect_boxes_with_fake_detector(tmp_path, fake_detector):
    weights = tmp_path / "fake.pt"
    weights.write_bytes(b"")
    images = [_image(tmp_path / f"{w}.png", (w, 40)) for w in (50, 60, 70)]
    model, loads = fake_detector({
        50: ([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 9, 9]], [0.5, 0.95, 0.3], [15, 15, 60]),
        60: ([[1, 1, 2, 2]], [0.1], [15]),
    })
    samples = [_sample("a", images[0], ["cats", "table"]),
               _sample("b", images[1], ["cat", "widget"]),
               _sample("c", images[2], [])]
    out = detect_boxes(samples, weights, batch=2, device="cpu")
    assert loads == [str(weights)]
    assert [(n, kw["conf"], kw["device"]) for n, kw in model.calls] == [(2, 0.25, "cpu"),
                                                                       (1, 0.25, "cpu")]
    assert [r.sample_id for r in out] == ["a", "b", "c"]
    assert [r.image_size for r in out] == [(50, 40), (60, 40), (70, 40)]
    a, b, c = out
    assert a.objects == [Detection("cats", "cat", (5.0, 6.0, 7.0, 8.0), 0.95),
                         Detection("table", "dining table", (0.0, 0.0, 9.0, 9.0), 0.3)]
    np.testing.assert_allclose(a.xyxy, [[5, 6, 7, 8], [0, 0, 9, 9]])
    assert a.box("table").coco_class == "dining table" and a.box("dog") is None
    assert b.objects == [Unmatched("cat", "no detection of class 'cat' above conf 0.25"),
                         Unmatched("widget", "no COCO class for 'widget'")]
    assert c.objects == [] and c.xyxy.shape == (0, 4)


def test_detect_boxes_input_errors(tmp_path, fake_detector):
    model, loads = fake_detector({})
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    good = _sample("ok", _image(tmp_path / "ok.png"), ["cat"])
    missing = _sample("gone", tmp_path / "gone.jpg", ["cat", "dog"])
    with pytest.raises(VislensError, match="nope.pt"):
        detect_boxes([good], tmp_path / "nope.pt")
    with pytest.raises(VislensError, match="missing.yaml"):
        detect_boxes([good], tmp_path / "missing.yaml")
    with pytest.raises(VislensError, match="gone.jpg"):
        detect_boxes([good, missing], weights)
    assert loads == [] and model.calls == []  # nothing loaded or run before the errors
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(VislensError, match="bad.png"):
        detect_boxes([_sample("bad", corrupt, ["cat"])], weights)
    out = detect_boxes([missing, good, _sample("bad", corrupt, ["cat"])], weights,
                       on_error="skip")
    assert [r.sample_id for r in out] == ["gone", "ok", "bad"]
    assert out[0].image_size is None and [u.label for u in out[0].unmatched] == ["cat", "dog"]
    assert all("image not found" in u.reason and "gone.jpg" in u.reason for u in out[0].unmatched)
    assert "cannot read image" in out[2].unmatched[0].reason
    assert model.calls[-1][0] == 1  # only the readable image went to the detector
    with pytest.raises(VislensError, match="on_error"):
        detect_boxes([good], weights, on_error="ignore")


# --------------------------------------------------------------------------- real YOLO, offline

@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every socket connect / DNS lookup raises and is recorded; cwd is a tmp dir."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("YOLO_OFFLINE", raising=False)  # detect_boxes must set it itself
    monkeypatch.chdir(tmp_path)
    return attempts


def test_yolo_plumbing_runs_offline(tmp_path, no_network):
    start = time.perf_counter()
    samples = [_sample("s0", _image(tmp_path / "s0.png", (64, 48), 1), ["black cat", "widget"]),
               _sample("s1", _image(tmp_path / "s1.png", (40, 56), 2), ["person"]),
               _sample("s2", tmp_path / "missing.png", ["cat"]),
               _sample("s3", _image(tmp_path / "s3.png", (32, 32), 3), [])]
    names = vb.coco_names()  # the untrained model's own names are "0".."79"
    out = detect_boxes(samples, "yolov8n.yaml", conf=0.99, batch=2, device="cpu",
                       class_names=names, on_error="skip")
    assert [r.sample_id for r in out] == ["s0", "s1", "s2", "s3"]
    assert [r.image_size for r in out] == [(64, 48), (40, 56), None, (32, 32)]
    assert out[0].objects == [
        Unmatched("black cat", "no detection of class 'cat' above conf 0.99"),
        Unmatched("widget", "no COCO class for 'widget'")]
    assert out[1].unmatched[0].label == "person" and out[2].unmatched[0].reason.startswith(
        "image not found")
    assert out[3].objects == []
    # a near-zero threshold lets garbage through: whatever matches must be well-formed
    low = detect_boxes(samples[:2], "yolov8n.yaml", conf=1e-4, device="cpu", class_names=names)
    for r in low:
        w, h = r.image_size
        for d in r.detections:
            x0, y0, x1, y1 = d.xyxy
            assert -1 <= x0 <= x1 <= w + 1 and -1 <= y0 <= y1 <= h + 1 and d.score >= 1e-4
        for u in r.unmatched:
            assert u.reason
    elapsed = time.perf_counter() - start
    from ultralytics.utils import USER_CONFIG_DIR

    assert (Path(USER_CONFIG_DIR) / "Arial.ttf").is_file()
    assert os.environ["YOLO_OFFLINE"] == "1"
    assert no_network == [], f"ultralytics tried the network: {no_network}"
    assert not (tmp_path / "runs").exists()  # predict saved nothing
    assert "ultralytics" in sys.modules and elapsed < 20


# --------------------------------------------------------------------------- safe weights

class _Marker:
    """Unpickling this object creates ``path``: the payload of a booby-trapped checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_booby_trapped_checkpoints_never_run(tmp_path):
    import pickle

    import torch

    marker = tmp_path / "PWNED"
    zipped = tmp_path / "trap.pt"  # torch.save's zip format, as real .pt files
    torch.save({"model": _Marker(marker), "date": "2024"}, zipped)
    legacy = tmp_path / "legacy.pt"  # a bare pickle named .pt
    legacy.write_bytes(pickle.dumps({"model": _Marker(marker)}))
    for weights, why in ((zipped, "references io.open"), (legacy, "not a checkpoint written by torch.save")):
        with pytest.raises(VislensError, match=why) as info:
            vb._load_detector(str(weights))
        assert "\n" not in str(info.value) and str(weights) in str(info.value)
        assert not marker.exists()
    sample = _sample("s0", _image(tmp_path / "s0.png"), ["cat"])
    with pytest.raises(VislensError, match="refusing to load"):
        detect_boxes([sample], zipped)  # the public path
    assert not marker.exists()


def test_checkpoint_cannot_call_allowed_constructors(tmp_path, monkeypatch):
    """An allowed class *called* with arguments (REDUCE) gets a bare instance, never __init__."""
    import torch

    vb._prepare_ultralytics()
    from ultralytics.nn.modules.conv import Conv

    calls = []
    original = Conv.__init__
    monkeypatch.setattr(Conv, "__init__", lambda self, *a, **k: (calls.append(a), original(self, *a, **k))[1])

    class Call:
        def __reduce__(self):
            return (Conv, (3, 16))

    weights = tmp_path / "call.pt"
    torch.save({"model": Call()}, weights)
    with pytest.raises(VislensError, match="not a usable ultralytics model"):
        vb._load_detector(str(weights))
    assert calls == []


def test_other_weight_formats_and_yaml_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("model.onnx", "model.torchscript", "model.pth"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(VislensError, match="must be an ultralytics .pt checkpoint"):
            detect_boxes([], tmp_path / name)
    yaml = tmp_path / "yolov8n.yaml"  # shadows the bundled name from the working directory
    yaml.write_text("nc: 80\nactivation: __import__('os').mkdir('PWNED')\n")
    with pytest.raises(VislensError, match="only as the name of one of ultralytics' bundled"):
        detect_boxes([], "yolov8n.yaml")
    with pytest.raises(VislensError, match="only as the name"):
        detect_boxes([], yaml)
    assert not (tmp_path / "PWNED").exists()


def test_bundled_yaml_name_never_reads_a_config_from_the_working_directory(tmp_path, monkeypatch):
    """ultralytics resolves ``yolov8n.yaml`` to ``yolov8.yaml`` and looks in the working
    directory first: a planted ``yolov8.yaml`` (valid, with a code-running activation) must be
    ignored, and the bundled config built instead."""
    vb._prepare_ultralytics()
    from ultralytics.utils import ROOT

    bundled = (Path(ROOT) / "cfg" / "models" / "v8" / "yolov8.yaml").read_text()
    for planted in ("yolov8.yaml", "yolov5n.yaml"):  # yolov5nu.yaml -> yolov5n.yaml likewise
        (tmp_path / planted).write_text(
            bundled + "\nactivation: __import__('os').mkdir('PWNED') or nn.ReLU()\n")
    monkeypatch.chdir(tmp_path)
    for name in ("yolov8n.yaml", "yolov5nu.yaml"):
        model = vb._load_detector(vb._check_weights(name))
        assert not (tmp_path / "PWNED").exists()
        acts = {type(m.act).__name__ for m in model.model.modules() if hasattr(m, "act")}
        assert acts == {"SiLU"}, acts  # the bundled config's default, not the planted ReLU
        assert Path(model.model.yaml["yaml_file"]).is_relative_to(ROOT)
    with pytest.raises(VislensError, match="not one of ultralytics' bundled model configs"):
        vb._load_detector("nosuchmodel.yaml")


def test_legitimate_checkpoint_loads_like_ultralytics(tmp_path, no_network):
    """A checkpoint saved the way ultralytics saves .pt files loads to the same weights and
    outputs as ultralytics' own (unrestricted) loader, and detect_boxes runs on it."""
    import torch

    vb._prepare_ultralytics()
    from ultralytics import YOLO

    weights = tmp_path / "v8n.pt"
    YOLO("yolov8n.yaml").save(weights)
    ours = vb._load_detector(str(weights))
    theirs = YOLO(str(weights))  # trusted here: we just wrote it
    assert ours.task == theirs.task == "detect" and ours.names == theirs.names
    a, b = ours.model.state_dict(), theirs.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x)[0], theirs.model(x)[0], rtol=1e-5, atol=0)
    samples = [_sample("s0", _image(tmp_path / "s0.png", (64, 48), 1), ["cat"])]
    out = detect_boxes(samples, weights, conf=0.5, device="cpu", class_names=vb.coco_names())
    assert [r.sample_id for r in out] == ["s0"] and out[0].image_size == (64, 48)
    assert no_network == []


def test_classification_checkpoint_is_refused(tmp_path):
    vb._prepare_ultralytics()
    from ultralytics import YOLO

    weights = tmp_path / "cls.pt"
    YOLO("yolov8n-cls.yaml").save(weights)
    with pytest.raises(VislensError, match="'classify' model gives no boxes"):
        vb._load_detector(str(weights))


# --------------------------------------------------------------------------- annotations

def test_annotation_boxes_exact_then_synonym(tmp_path):
    img = _image(tmp_path / "a.png", (80, 60))
    samples = [
        _sample("exact", img, ["ball", "box"], [Box("box", (1, 2, 3, 4)), Box("ball", (5, 6, 7, 8))]),
        _sample("syn", tmp_path / "nofile.png", ["black cat", "table"],
                [Box("dining table", (0, 0, 9, 9)), Box("Cat", (1, 1, 2, 2))]),
        _sample("prefer", img, ["person", "man"], [Box("man", (0, 0, 1, 1)), Box("person", (2, 2, 3, 3))]),
        _sample("none", img, ["tree", "moon"], [Box("tree", (0, 0, 5, 5))]),
        _sample("empty", img, ["tree"]),
    ]
    ex, syn, prefer, none, empty = annotation_boxes(samples)
    assert ex.image_size == (80, 60) and syn.image_size is None
    assert ex.objects == [Detection("ball", "ball", (5.0, 6.0, 7.0, 8.0), 1.0),
                          Detection("box", "box", (1.0, 2.0, 3.0, 4.0), 1.0)]
    assert [(d.label, d.coco_class) for d in syn.detections] == [("black cat", "Cat"),
                                                                 ("table", "dining table")]
    assert [d.xyxy for d in prefer.detections] == [(2.0, 2.0, 3.0, 3.0), (0.0, 0.0, 1.0, 1.0)]
    assert none.objects[1] == Unmatched("moon", "no annotated box labelled 'moon' (labels: tree)")
    assert empty.objects == [Unmatched("tree", "sample has no annotated boxes")]


def test_annotation_boxes_on_synthetic_scenes(tmp_path):
    from vislens.data.jsonl import load_jsonl
    from vislens.synth import generate_scenes, write_scenes

    samples = load_jsonl(write_scenes(generate_scenes(6, "a", seed=0), tmp_path))
    results = annotation_boxes(samples)
    for s, r in zip(samples, results):
        assert not r.unmatched and r.image_size == (48, 48)
        assert [d.label for d in r.detections] == s.objects
        mask = box_mask(r.xyxy[:1], r.image_size, 24)
        x0, y0, x1, y1 = r.detections[0].xyxy
        assert mask.sum() == pytest.approx((x1 - x0) * (y1 - y0) / 4.0)  # 2 x 2 px cells
