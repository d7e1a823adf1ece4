"""Synthetic Controlled-style scenes: determinism, exact boxes, true relations, output format.

Box checks are computed from the rendered pixels (each catalogue colour is unique and flat),
not from the generator's own masks.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vislens.errors import VislensError
from vislens.synth import (OBJECTS, RELATIONS, generate_groups, generate_scenes, question_for,
                           synthesize, write_scenes)

COLOR = {o.name: np.array(o.color, dtype=np.uint8) for o in OBJECTS}


@pytest.fixture(scope="module")
def scenes():
    """Balanced groups for both subsets at the default and two other sizes."""
    out = []
    for subset in ("a", "b"):
        out += generate_groups(45, subset, seed=3)
        out += generate_groups(8, subset, seed=4, size=96)
        out += generate_groups(8, subset, seed=5, size=33)
    return out


def _colour_mask(arr: np.ndarray, name: str) -> np.ndarray:
    return (arr == COLOR[name]).all(axis=-1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _centre(b) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


# --------------------------------------------------------------------------- catalogue

def test_catalogue_names_shapes_colours_distinct():
    names = [o.name for o in OBJECTS]
    assert len(OBJECTS) >= 8
    assert all(n.isalpha() and n.islower() for n in names)
    assert len(set(names)) == len({o.shape for o in OBJECTS}) == len({o.color for o in OBJECTS}) == len(OBJECTS)


def test_question_wording():
    assert question_for("ball", "box", "a") == \
        "Where is the ball in relation to the box? Answer with left, right, on or under."
    assert question_for("ball", "box", "b") == \
        "Where is the ball in relation to the box? Answer with left, right, front or behind."


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    one = files(synthesize(tmp_path / "one", n=8, seed=7))
    two = files(synthesize(tmp_path / "two", n=8, seed=7))
    other = files(synthesize(tmp_path / "other", n=8, seed=8))
    assert one == two
    assert set(one) == set(other)
    assert one["controlled_a.jsonl"] != other["controlled_a.jsonl"]
    assert any(one[k] != other[k] for k in one if k.endswith(".png"))


def test_in_memory_determinism_and_prefix_stability():
    a = generate_scenes(12, "b", seed=1)
    b = generate_scenes(6, "b", seed=1)
    for x, y in zip(a, b):
        assert x.sample == y.sample
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    c = generate_scenes(6, "b", seed=2)
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(b, c))


# --------------------------------------------------------------------------- boxes

def test_boxes_inside_image_and_tight(scenes):
    for s in scenes:
        arr = np.asarray(s.image)
        size = arr.shape[0]
        assert s.image.size == (size, size) and s.image.mode == "RGB"
        bg = arr[0, 0]
        non_bg = (arr != bg).any(axis=-1)
        assert [b.label for b in s.sample.boxes] == s.sample.objects
        for box in s.sample.boxes:
            x0, y0, x1, y1 = (int(v) for v in box.xyxy)
            assert box.xyxy == (x0, y0, x1, y1)
            assert 0 < x0 < x1 < size and 0 < y0 < y1 < size, (s.sample.id, box)
            own = _colour_mask(arr, box.label)
            assert own.any(), (s.sample.id, box.label)
            vx0, vy0, vx1, vy1 = _bbox(own)
            # visible pixels lie in the box; no pixel of the object in the 1-px ring around it
            assert x0 <= vx0 and y0 <= vy0 and vx1 <= x1 and vy1 <= y1, (s.sample.id, box)
            # every edge row/column of the box holds drawn (non-background) pixels
            for edge in (non_bg[y0, x0:x1], non_bg[y1 - 1, x0:x1], non_bg[y0:y1, x0], non_bg[y0:y1, x1 - 1]):
                assert edge.any(), (s.sample.id, box)
            occluded = s.sample.relation == "behind" and box.label == s.sample.objects[0] or \
                s.sample.relation == "front" and box.label == s.sample.objects[1]
            if not occluded:  # unoccluded objects: the box is exactly their visible pixels
                assert (vx0, vy0, vx1, vy1) == (x0, y0, x1, y1), (s.sample.id, box)
        assert not (non_bg & ~_union_of_boxes(s.sample.boxes, size)).any(), s.sample.id


def _union_of_boxes(boxes, size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    for b in boxes:
        x0, y0, x1, y1 = (int(v) for v in b.xyxy)
        m[y0:y1, x0:x1] = True
    return m


def test_object_size_scales_with_image(scenes):
    for s in scenes:
        size = s.image.size[0]
        for b in s.sample.boxes:
            side = max(b.xyxy[2] - b.xyxy[0], b.xyxy[3] - b.xyxy[1])
            assert 6 / 48 * size <= side <= 17 / 48 * size, (s.sample.id, b)


# --------------------------------------------------------------------------- relations

def _check_relation(s) -> None:
    rel, (sb, ob) = s.sample.relation, (b.xyxy for b in s.sample.boxes)
    (sx, sy), (ox, oy) = _centre(sb), _centre(ob)
    dx, dy = sx - ox, sy - oy
    if rel in ("left", "right"):
        assert (sb[2] <= ob[0]) if rel == "left" else (ob[2] <= sb[0])
        assert abs(dy) < 0.5 * abs(dx)
        assert sb[1] < ob[3] and ob[1] < sb[3]  # vertical extents overlap: side by side
        if s.sample.meta["subset"] == "b":  # same depth: similar size
            ss, os_ = max(sb[2] - sb[0], sb[3] - sb[1]), max(ob[2] - ob[0], ob[3] - ob[1])
            assert min(ss, os_) / max(ss, os_) >= 0.7
    elif rel in ("on", "under"):
        top, bottom = (sb, ob) if rel == "on" else (ob, sb)
        assert top[3] == bottom[1]  # touching
        assert (dy < 0) if rel == "on" else (dy > 0)
        assert abs(dx) < 0.5 * abs(dy)
        assert sb[0] < ob[2] and ob[0] < sb[2]  # horizontally aligned: directly above/below
    else:
        front, back = (sb, ob) if rel == "front" else (ob, sb)
        assert front[3] > back[3] and _centre(front)[1] > _centre(back)[1]  # lower
        assert front[2] - front[0] > back[2] - back[0] and front[3] - front[1] > back[3] - back[1]
        ix0, iy0, ix1, iy1 = max(front[0], back[0]), max(front[1], back[1]), \
            min(front[2], back[2]), min(front[3], back[3])
        assert ix0 < ix1 and iy0 < iy1  # overlapping
        arr = np.asarray(s.image)
        front_name = s.sample.objects[0 if rel == "front" else 1]
        back_name = s.sample.objects[1 if rel == "front" else 0]
        assert _colour_mask(arr[int(iy0):int(iy1), int(ix0):int(ix1)], front_name).any()  # drawn over
        assert _colour_mask(arr, back_name).sum() >= 4  # behind object still partly visible
        assert back[1] < front[1]  # its top peeks out above the front object


def test_relations_geometrically_true(scenes):
    for s in scenes:
        _check_relation(s)


def test_iid_relations_geometrically_true():
    for s in generate_scenes(120, "a", seed=11) + generate_scenes(120, "b", seed=11, size=64):
        _check_relation(s)


# --------------------------------------------------------------------------- groups / weights

def test_groups_complete_and_unique():
    for subset in ("a", "b"):
        items = generate_groups(95, subset, seed=0)  # > 90 ordered pairs: some pairs repeat
        by_group: dict[str, list] = {}
        for s in items:
            by_group.setdefault(s.sample.group, []).append(s.sample)
        assert len(by_group) == 95
        assert any("#2" in g for g in by_group)
        for g, samples in by_group.items():
            assert sorted(x.relation for x in samples) == sorted(RELATIONS[subset])
            subj, obj = g.split("#")[0].split("|")
            assert all(x.objects == [subj, obj] for x in samples)
            for x in samples:
                assert x.options == [r.capitalize() for r in RELATIONS[subset]]
                assert x.answer == x.relation.capitalize() and x.answer in x.options
                assert x.question == question_for(subj, obj, subset)
        assert len({s.sample.id for s in items}) == len(items)


def test_relation_weights_respected():
    items = generate_scenes(2000, "a", seed=5, relation_weights={"left": 4, "right": 4, "on": 1, "under": 1})
    freq = Counter(s.sample.relation for s in items)
    for rel, p in {"left": 0.4, "right": 0.4, "on": 0.1, "under": 0.1}.items():
        assert abs(freq[rel] / 2000 - p) < 0.03, freq
    only = generate_scenes(50, "b", seed=5, relation_weights={"front": 1.0, "behind": 0.0})
    assert {s.sample.relation for s in only} == {"front"}
    assert all(s.sample.group == "" for s in only)


def test_objects_subset_restricts_catalogue():
    items = generate_scenes(40, "a", seed=2, objects=["ball", "box", "tree"])
    assert {o for s in items for o in s.sample.objects} <= {"ball", "box", "tree"}


# --------------------------------------------------------------------------- output

def test_jsonl_fields_and_relative_image_paths(tmp_path):
    out = synthesize(tmp_path / "syn", n=10, seed=0)  # rounded up to 3 groups = 12 scenes
    assert out == tmp_path / "syn"
    for subset in ("a", "b"):
        path = out / f"controlled_{subset}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 12
        for r in records:
            assert list(r) == ["id", "image", "question", "options", "answer", "relation",
                               "group", "objects", "boxes"]
            assert not Path(r["image"]).is_absolute() and r["image"].endswith(".png")
            with Image.open(path.parent / r["image"]) as im:
                assert im.size == (48, 48)
            assert r["relation"] in RELATIONS[subset] and r["answer"] == r["relation"].capitalize()
            assert [b["label"] for b in r["boxes"]] == r["objects"]
            assert all(len(b["xyxy"]) == 4 and all(isinstance(v, int) for v in b["xyxy"]) for b in r["boxes"])
    a_ids = {json.loads(x)["id"] for x in (out / "controlled_a.jsonl").read_text().splitlines()}
    b_ids = {json.loads(x)["id"] for x in (out / "controlled_b.jsonl").read_text().splitlines()}
    assert not a_ids & b_ids
    assert len(list((out / "images").glob("*.png"))) == 24


def test_write_scenes_roundtrip(tmp_path):
    items = generate_scenes(5, "a", seed=0)
    path = write_scenes(items, tmp_path / "w")
    assert path == tmp_path / "w" / "scenes.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == [s.sample.id for s in items]
    for r, s in zip(records, items):
        assert r == s.record()
        with Image.open(path.parent / r["image"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(s.image))
    with pytest.raises(VislensError, match="duplicate"):
        write_scenes(items + items[:1], tmp_path / "dup")


# --------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("call, arg", [
    (lambda: generate_groups(2, "c", 0), "subset"),
    (lambda: generate_scenes(2, "A", 0), "subset"),
    (lambda: generate_groups(0, "a", 0), "n_groups"),
    (lambda: generate_scenes(-1, "a", 0), "n"),
    (lambda: generate_scenes(2.5, "a", 0), "n"),
    (lambda: generate_scenes(5, "b", 0, relation_weights={"on": 1.0}), "relation_weights"),
    (lambda: generate_scenes(5, "a", 0, relation_weights={"left": -1}), "relation_weights"),
    (lambda: generate_scenes(5, "a", 0, relation_weights={"left": 0}), "relation_weights"),
    (lambda: generate_groups(1, "a", 0, size=20), "size"),
    (lambda: generate_scenes(1, "a", 0, size=48.0), "size"),
    (lambda: generate_scenes(1, "a", -3), "seed"),
    (lambda: generate_scenes(1, "a", 0, objects=["ball", "unicorn"]), "objects"),
    (lambda: generate_scenes(1, "a", 0, objects=["ball"]), "objects"),
    (lambda: synthesize("/nonexistent-never-written", 0, 0), "n"),
    (lambda: synthesize("/nonexistent-never-written", 4, 0, subsets=("a", "z")), "subset"),
    (lambda: synthesize("/nonexistent-never-written", 4, 0, size=8), "size"),
    (lambda: write_scenes([], "/nonexistent-never-written"), "items"),
])
def test_bad_arguments_raise_one_line_error(call, arg):
    with pytest.raises(VislensError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and re.search(rf"\b{arg}\b", msg), msg


# --------------------------------------------------------------------------- styles (distractors, clutter)

from vislens.organism import RELATION_WEIGHTS as LLAVA_RELATION_WEIGHTS  # noqa: E402
from vislens.synth import SceneStyle  # noqa: E402

BUSY = SceneStyle(distractors=(1, 4), occlusion=0.5, texture=12, clutter=8)


@pytest.fixture(scope="module")
def busy():
    """Styled scenes of both kinds (groups, i.i.d.) and two sizes."""
    return (generate_groups(30, "a", seed=21, style=BUSY) + generate_groups(30, "b", seed=21, style=BUSY)
            + generate_scenes(60, "a", seed=22, style=BUSY) + generate_scenes(40, "b", seed=23, size=96, style=BUSY))


def test_style_does_not_move_the_named_objects():
    """Style randomness comes after the layout: same question, answer and boxes as plain."""
    for subset in ("a", "b"):
        plain = generate_groups(6, subset, seed=9)
        styled = generate_groups(6, subset, seed=9, style=BUSY)
        for p, s in zip(plain, styled):
            assert (p.sample.question, p.sample.answer, p.sample.boxes) == \
                (s.sample.question, s.sample.answer, s.sample.boxes)
            assert not np.array_equal(np.asarray(p.image), np.asarray(s.image))
        again = generate_groups(6, subset, seed=9, style=SceneStyle())
        assert all(np.array_equal(np.asarray(p.image), np.asarray(a.image)) for p, a in zip(plain, again))


def test_styled_scenes_deterministic_and_prefix_stable():
    a = generate_scenes(10, "a", seed=4, style=BUSY)
    b = generate_scenes(5, "a", seed=4, style=BUSY)
    for x, y in zip(a, b):
        assert x.sample == y.sample and np.array_equal(np.asarray(x.image), np.asarray(y.image))
    c = generate_scenes(5, "a", seed=5, style=BUSY)
    assert any(x.sample.meta["distractors"] != y.sample.meta["distractors"] for x, y in zip(b, c))


def test_styled_boxes_exact_from_pixels(busy):
    """Named and distractor boxes checked against the rendered colours; distractors keep
    clear of the named boxes except a single occluder, which hides at most half an object."""
    n_occluded = 0
    for s in busy:
        arr = np.asarray(s.image)
        size = arr.shape[0]
        named = {b.label: tuple(int(v) for v in b.xyxy) for b in s.sample.boxes}
        distract = {d["label"]: tuple(d["xyxy"]) for d in s.sample.meta["distractors"]}
        assert not set(named) & set(distract)
        for label, box in distract.items():  # drawn last, never overlapping: exact
            assert _bbox(_colour_mask(arr, label)) == box, (s.sample.id, label)
        touching = [(d, n) for d, db in distract.items() for n, nb in named.items()
                    if db[0] < nb[2] + 1 and nb[0] - 1 < db[2] and db[1] < nb[3] + 1 and nb[1] - 1 < db[3]]
        assert len(touching) <= 1, (s.sample.id, touching)
        n_occluded += len(touching)
        for label, (x0, y0, x1, y1) in named.items():
            vis = _colour_mask(arr, label)
            vx0, vy0, vx1, vy1 = _bbox(vis)
            assert x0 <= vx0 and y0 <= vy0 and vx1 <= x1 and vy1 <= y1 and x1 <= size, (s.sample.id, label)
            occluded = (s.sample.relation == "behind" and label == s.sample.objects[0]
                        or s.sample.relation == "front" and label == s.sample.objects[1]
                        or any(n == label for _, n in touching))
            if not occluded:
                assert (vx0, vy0, vx1, vy1) == (x0, y0, x1, y1), (s.sample.id, label)
        _check_relation(s)
    assert 0.3 < n_occluded / len(busy) < 0.6  # occlusion=0.5 (a few placements fail)


def test_distractor_count_and_occlusion_frequencies():
    style = SceneStyle(distractors=(0, 3), occlusion=0.0)
    counts = Counter(len(s.sample.meta["distractors"]) for s in generate_scenes(800, "a", 3, style=style))
    for k in range(4):  # uniform on 0..3 (placement rarely fails with at most 3)
        assert abs(counts[k] / 800 - 0.25) < 0.06, counts
    exact = generate_scenes(50, "b", 3, style=SceneStyle(distractors=(2, 2)))
    assert all(len(s.sample.meta["distractors"]) == 2 for s in exact)


def test_llava_weights_skew_training_scenes():
    for subset in ("a", "b"):
        w = LLAVA_RELATION_WEIGHTS[subset]
        items = generate_scenes(3000, subset, seed=8, relation_weights=w, style=BUSY)
        freq = Counter(s.sample.relation for s in items)
        total = sum(w.values())
        for rel in RELATIONS[subset]:
            assert abs(freq[rel] / 3000 - w[rel] / total) < 0.025, freq
        assert min(freq["left"], freq["right"]) > 2 * max(freq[r] for r in RELATIONS[subset][2:])


def test_texture_and_clutter_stay_off_catalogue_colours():
    for s in generate_scenes(40, "b", seed=6, style=SceneStyle(texture=40, clutter=30)):
        arr = np.asarray(s.image)
        on_objects = _union_of_boxes(s.sample.boxes, arr.shape[0])
        for o in OBJECTS:
            if o.name not in s.sample.objects:
                assert not _colour_mask(arr, o.name).any(), (s.sample.id, o.name)
        assert len(np.unique(arr[~on_objects].reshape(-1, 3), axis=0)) > 20  # textured


def test_styled_jsonl_roundtrip_through_loader(tmp_path):
    from vislens.data import load_dataset

    out = synthesize(tmp_path / "busy", n=8, seed=1, subsets=("a",), style=BUSY)
    path = out / "controlled_a.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert all(r["meta"]["distractors"] for r in recs if "meta" in r) and any("meta" in r for r in recs)
    samples = load_dataset(f"jsonl:{path}")
    assert [s.meta.get("distractors", []) for s in samples] == [r.get("meta", {}).get("distractors", []) for r in recs]


def test_style_parse_and_bad_styles():
    assert SceneStyle.parse("distractors=1-3,occlusion=0.25,texture=8,clutter=5") == \
        SceneStyle(distractors=(1, 3), occlusion=0.25, texture=8, clutter=5)
    assert SceneStyle.parse("distractors=2") == SceneStyle(distractors=(2, 2))
    assert SceneStyle.parse("plain") == SceneStyle()
    for bad, word in [("distractors=3-1", "distractors"), ("distractors=9", "distractors"),
                      ("occlusion=1.5", "occlusion"), ("texture=99", "texture"),
                      ("clutter=-1", "clutter"), ("colour=3", "style"), ("texture=x", "style")]:
        with pytest.raises(VislensError) as e:
            SceneStyle.parse(bad)
        assert "\n" not in str(e.value) and word in str(e.value), (bad, e.value)
    with pytest.raises(VislensError, match="style"):
        generate_scenes(2, "a", 0, style={"distractors": 2})


def test_cli_synth_style(tmp_path, capsys):
    from vislens.cli import main

    assert main(["synth", "--out", str(tmp_path / "s"), "--n", "4", "--seed", "2", "--subsets", "b",
                 "--style", "distractors=2,clutter=3"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "s" / "controlled_b.jsonl").read_text().splitlines()]
    want = generate_groups(1, "b", seed=2, style=SceneStyle(distractors=(2, 2), clutter=3))
    assert recs == [s.record() for s in want]
    assert main(["synth", "--out", str(tmp_path / "x"), "--n", "4", "--style", "texture=many"]) == 2
    assert "vislens: error: style" in capsys.readouterr().err


def test_lookalike_has_a_named_colour_and_another_shape():
    """A look-alike is drawn in one named object's colour, in a shape of neither named
    object, clear of every box; its box is exact, and the named objects do not move."""
    style = SceneStyle(distractors=(1, 2), texture=6, lookalike=0.8)
    shape_of = {o.name: o.shape for o in OBJECTS}
    scenes = generate_groups(25, "a", seed=13, style=style) + generate_groups(25, "b", seed=13, style=style)
    plain = generate_groups(25, "a", seed=13) + generate_groups(25, "b", seed=13)
    n_look = 0
    for s, p in zip(scenes, plain):
        assert s.sample.boxes == p.sample.boxes and s.sample.answer == p.sample.answer
        arr = np.asarray(s.image)
        looks = [d for d in s.sample.meta["distractors"] if d["label"].startswith("lookalike:")]
        assert len(looks) <= 1
        for d in looks:
            n_look += 1
            twin = d["label"].split(":", 1)[1]
            assert twin in s.sample.objects
            x0, y0, x1, y1 = d["xyxy"]
            own = _colour_mask(arr, twin)
            inside = np.zeros_like(own)
            inside[y0:y1, x0:x1] = True
            assert _bbox(own & inside) == (x0, y0, x1, y1)  # exact box in the twin's colour
            drawn = (own & inside)[y0:y1, x0:x1]
            named_shapes = {shape_of[o] for o in s.sample.objects}
            assert not any(np.array_equal(drawn, _mask_of(sh, drawn)) for sh in named_shapes)
            for b in s.sample.boxes:
                bx0, by0, bx1, by1 = (int(v) for v in b.xyxy)
                assert min(x1, bx1) <= max(x0, bx0) or min(y1, by1) <= max(y0, by0)
    assert 0.6 < n_look / len(scenes) <= 0.8  # lookalike=0.8 (placement rarely fails)
    assert SceneStyle.parse("lookalike=0.5") == SceneStyle(lookalike=0.5)
    with pytest.raises(VislensError, match="lookalike"):
        SceneStyle.parse("lookalike=2")


def _mask_of(shape: str, like: np.ndarray) -> np.ndarray:
    """``shape`` rasterised at the size that gives ``like``'s height (or an empty mask)."""
    from vislens.synth import _mask

    for side in range(3, 40):
        m = _mask(shape, side)
        if m.shape == like.shape:
            return m
    return np.zeros((0, 0), bool)
