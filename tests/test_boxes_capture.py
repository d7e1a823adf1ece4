"""``vislens boxes`` on a capture file: annotation boxes and (untrained, offline) YOLO."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vislens.boxes import box_mask, objects_from_question
from vislens.errors import VislensError
from vislens.store import open_capture


@pytest.fixture(scope="module")
def capture_file(tiny_dir, tmp_path_factory):
    from vislens.capture import run_capture
    from vislens.synth import generate_groups, write_scenes

    tmp = tmp_path_factory.mktemp("boxcap")
    data = write_scenes(generate_groups(1, "a", seed=5), tmp / "s", name="a.jsonl")
    s = run_capture(model=str(tiny_dir("llava")), dataset=f"jsonl:{data}", out=tmp / "c.h5",
                    conditions=["baseline"], max_new_tokens=1, device="cpu", progress=False,
                    log=lambda m: None)
    return s.path, data


def test_objects_from_question():
    assert objects_from_question("Where is the beer bottle in relation to the armchair? Answer with left") == \
        ["beer bottle", "armchair"]
    assert objects_from_question("Where are the cats in the photo? Answer with top") == ["cats"]


def test_annotation_boxes_replace_the_mask_atomically(capture_file, tmp_path):
    from vislens.cli import main

    path, data = capture_file
    target = tmp_path / "c.h5"
    target.write_bytes(path.read_bytes())
    with open_capture(target) as c:
        before = c.attention("baseline")
    assert main(["boxes", str(target), "--detector", "annotations"]) == 0
    recs = [json.loads(l) for l in data.read_text().splitlines()]
    with open_capture(target) as c:
        assert c.boxes() is not None and len(c.boxes()) == 2 * len(recs)
        mask = c.box_mask()
        for i, r in enumerate(recs):
            expect = box_mask(np.array([b["xyxy"] for b in r["boxes"]], float), (48, 48), 24)
            np.testing.assert_allclose(mask[i], expect)
        np.testing.assert_array_equal(c.attention("baseline"), before)  # nothing else changed
        assert c.attrs["complete"]


def test_yolo_plumbing_offline_records_unmatched(capture_file, tmp_path, monkeypatch):
    import socket

    from vislens.boxes import attach_boxes

    def no_net(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_net)
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    path, _ = capture_file
    target = tmp_path / "y.h5"
    target.write_bytes(path.read_bytes())
    r = attach_boxes(target, "yolo", weights="yolov8n.yaml", conf=0.99)
    assert r["samples"] == 4 and r["boxes"] + r["unmatched"] == 8
    with open_capture(target) as c:
        um = c.unmatched()
        assert len(um) == r["unmatched"] and um["reason"].str.len().min() > 0


def test_boxes_errors(capture_file, tmp_path):
    from vislens.boxes import attach_boxes

    path, _ = capture_file
    with pytest.raises(VislensError, match="--weights"):
        attach_boxes(path, "yolo")
    with pytest.raises(VislensError, match="nope.pt"):
        attach_boxes(path, "yolo", weights=tmp_path / "nope.pt")
    with pytest.raises(VislensError, match="--detector"):
        attach_boxes(path, "sam")


# ----------------------------------------------------------------------------- data safety

from small_disk import fill, make_read_only, small_disk  # noqa: E402,F401


def _boxes_cli(target, capfd) -> list[str]:
    from vislens.cli import main

    capfd.readouterr()
    assert main(["boxes", str(target), "--detector", "annotations"]) == 2
    return [line for line in capfd.readouterr().err.split("\n") if line.strip()]


def test_boxes_disk_full_is_one_line_and_keeps_the_file(capture_file, tmp_path, small_disk,
                                                         monkeypatch, capfd):
    from test_store import disk_or_injection

    path, _ = capture_file
    disk, injected = disk_or_injection(small_disk, "1m", tmp_path, monkeypatch)
    target = disk / "c.h5"
    target.write_bytes(path.read_bytes())
    if not injected:
        fill(disk)
    before = target.read_bytes()
    err = _boxes_cli(target, capfd)
    assert len(err) == 1 and err[0].startswith("vislens: error: ") and \
        "No space left on device" in err[0], err
    assert target.read_bytes() == before
    assert not (disk / "c.h5.lock").exists() and not (disk / "c.h5.tmp").exists()


def test_boxes_in_a_read_only_folder_is_one_line(capture_file, tmp_path, small_disk, capfd):
    path, _ = capture_file
    disk = small_disk("1m") or (tmp_path / "ro")
    disk.mkdir(exist_ok=True)
    target = disk / "c.h5"
    target.write_bytes(path.read_bytes())
    make_read_only(disk)
    if os.access(disk, os.W_OK):
        pytest.skip("this user can write any folder")
    err = _boxes_cli(target, capfd)
    assert len(err) == 1 and "not writable" in err[0], err


def test_capture_time_mask_uses_the_same_box_choice_as_vislens_boxes(tmp_path):
    """A question's mask at capture time covers the question's objects only, matched by the
    rule ``vislens boxes --detector annotations`` uses (case, synonyms), never a distractor."""
    from PIL import Image

    from vislens.boxes import annotation_boxes
    from vislens.capture import annotation_masks
    from vislens.data.base import Box, Sample

    img = tmp_path / "scene.png"
    Image.new("RGB", (240, 240)).save(img)
    cup, plate, table = (0, 0, 40, 40), (200, 200, 240, 240), (0, 120, 240, 160)
    samples = [
        # label differs from the object name only in case: the plate is a distractor
        Sample("s0", str(img), "Where is the cup?", ["Left", "Right"], "Left",
               objects=["cup"], boxes=[Box("Cup", cup), Box("plate", plate)]),
        # "table" is annotated as COCO's "dining table"
        Sample("s1", str(img), "Where is the cup?", ["Left", "Right"], "Left",
               objects=["cup", "table"],
               boxes=[Box("cup", cup), Box("plate", plate), Box("dining table", table)]),
    ]
    masks, _, sizes = annotation_masks(samples, 24)
    for k, (s, res) in enumerate(zip(samples, annotation_boxes(samples))):
        # hand reference: the question's boxes on the 24-grid (10 px cells)
        want = np.zeros((24, 24), np.float32)
        for b in s.boxes:
            if b.label.lower() != "plate":
                x0, y0, x1, y1 = (int(v) // 10 for v in b.xyxy)
                want[y0:y1, x0:x1] = 1
        np.testing.assert_array_equal(masks[k], want)
        np.testing.assert_array_equal(masks[k], box_mask(res.xyxy, sizes[k], 24))


# ----------------------------------------------------------------------------- dataset reload

def _relative_capture(tiny_dir, folder, records, name="d.jsonl"):
    """A capture of ``records`` (one 48x48 image, a red square at the top left) made in
    ``folder`` with the dataset named by a relative path, as a user in that folder types it."""
    from PIL import Image

    from vislens.capture import run_capture

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 48), (200, 10, 10)).save(folder / "im.png")
    (folder / name).write_text("\n".join(json.dumps(r) for r in records))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        s = run_capture(model=str(tiny_dir("llava")), dataset=f"jsonl:{name}", out="c.h5",
                        conditions=["baseline"], max_new_tokens=1, device="cpu",
                        progress=False, log=lambda m: None)
    finally:
        os.chdir(cwd)
    return folder / s.path.name


def _record(i, question, boxes, objects=None):
    rec = {"id": f"s{i}", "image": "im.png", "question": question, "options": ["Yes", "No"],
           "answer": "Yes", "boxes": [{"label": l, "xyxy": xyxy} for l, xyxy in boxes]}
    if objects is not None:
        rec["objects"] = objects
    return rec


def test_annotation_boxes_refused_when_the_dataset_cannot_be_reloaded(tiny_dir, tmp_path,
                                                                      monkeypatch, capfd):
    """A capture whose JSONL was named by a relative path, boxed from another folder: the
    dataset's boxes cannot be read, so the capture's own boxes must not be replaced by none
    (they were, with "sample has no annotated boxes" for every object)."""
    from vislens.cli import main

    q = "Where is the square in relation to the dot? Answer with yes or no."
    target = _relative_capture(tiny_dir, tmp_path / "proj", [
        _record(i, q, [("square", [0, 0, 24, 24]), ("dot", [30, 30, 36, 36])]) for i in range(2)])
    with open_capture(target) as c:
        mask_before = c.box_mask()
    before = target.read_bytes()
    # hand reference: the square covers the top-left 12x12 cells, the dot 3x3 cells
    assert mask_before[0].sum() == pytest.approx(12 * 12 + 3 * 3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capfd.readouterr()
    assert main(["boxes", str(target), "--detector", "annotations"]) == 2
    err = [l for l in capfd.readouterr().err.split("\n") if l.strip()]
    assert len(err) == 1 and err[0].startswith("vislens: error: ") and "jsonl:d.jsonl" in err[0], err
    assert target.read_bytes() == before
    monkeypatch.chdir(tmp_path / "proj")  # where the capture was made: it works
    assert main(["boxes", str(target), "--detector", "annotations"]) == 0
    with open_capture(target) as c:
        np.testing.assert_array_equal(c.box_mask(), mask_before)


def test_yolo_refused_when_objects_are_lost_with_the_dataset(tiny_dir, tmp_path, monkeypatch):
    """Without its dataset, a sample whose question names no objects would get no boxes and
    no "unmatched" record either: refused, naming the sample and the dataset."""
    from vislens.boxes import attach_boxes

    q = "Is the square at the top left? Answer with yes or no."
    target = _relative_capture(tiny_dir, tmp_path / "proj", [
        _record(0, q, [("square", [0, 0, 24, 24])], objects=["square"])])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VislensError, match=r"s0.*jsonl:d\.jsonl|jsonl:d\.jsonl.*s0"):
        attach_boxes(target, "yolo", weights="yolov8n.yaml")


def test_annotation_boxes_of_a_sample_naming_no_objects_match_capture_time(tiny_dir, tmp_path,
                                                                           monkeypatch):
    """A sample with boxes but no objects (none in the record, none in the question): the
    capture's mask counts every box; ``vislens boxes --detector annotations`` gave it an
    empty mask and no boxes (0 boxes, 0 unmatched: silently)."""
    from vislens.boxes import attach_boxes

    q = "Is the red square left of the blue one?"
    target = _relative_capture(tiny_dir, tmp_path / "proj", [
        _record(0, q, [("red square", [0, 0, 24, 24]), ("blue square", [24, 36, 48, 48])])])
    with open_capture(target) as c:
        mask_before = c.box_mask()
    # hand reference: 12x12 cells full, then 12 columns x 6 rows
    want = np.zeros((24, 24), np.float32)
    want[:12, :12] = 1
    want[18:, 12:] = 1
    np.testing.assert_array_equal(mask_before[0], want)
    monkeypatch.chdir(tmp_path / "proj")
    r = attach_boxes(target, "annotations")
    assert r == {"samples": 1, "boxes": 2, "unmatched": 0, "with_mask": 1}
    with open_capture(target) as c:
        np.testing.assert_array_equal(c.box_mask()[0], want)
        assert sorted(c.boxes()["label"]) == ["blue square", "red square"]


def test_dataset_boxes_that_cannot_be_pixels_of_the_image_are_refused(tmp_path):
    """Boxes given as fractions of the image (YOLO-style) or lying outside it made an empty
    or near-empty mask at capture time without a word; a box partly outside is clipped."""
    from PIL import Image

    from vislens.capture import annotation_masks
    from vislens.data.base import Box, Sample

    img = tmp_path / "p.png"
    Image.new("RGB", (240, 120)).save(img)

    def sample(sid, cup):
        return Sample(sid, str(img), "Where is the cup in relation to the plate?", ["Left", "Right"],
                      "Left", objects=["cup", "plate"], boxes=[Box("cup", cup), Box("plate", (200, 0, 240, 40))])

    with pytest.raises(VislensError, match=r"sample frac: box 'cup' \[0\.1, 0\.2, 0\.3, 0\.4\].*"
                                           r"in \[0, 1\].*pixels"):
        annotation_masks([sample("frac", (0.1, 0.2, 0.3, 0.4))], 24)
    with pytest.raises(VislensError, match=r"sample out: box 'cup' \[250\.0, 10\.0, 300\.0, 60\.0\] "
                                           r"lies outside its 240x120 image"):
        annotation_masks([sample("out", (250, 10, 300, 60))], 24)
    # partly outside: clipped to the image (hand reference: 10 x 5 px cells)
    masks, _, _ = annotation_masks([sample("part", (-20, -10, 30, 20))], 24)
    want = np.zeros((24, 24), np.float32)
    want[:4, :3] = 1     # cup: x 0..30, y 0..20
    want[:8, 20:] = 1    # plate: x 200..240, y 0..40
    np.testing.assert_array_equal(masks[0], want)
