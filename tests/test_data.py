"""Dataset loaders: real AdaptVis/VSR files (when ../shared exists) and small fake downloads."""
from __future__ import annotations

import json
import math
import random
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vislens.data import (
    DATASET_NAMES,
    Box,
    Sample,
    assign_splits,
    check_images,
    load_adaptvis_questions,
    load_dataset,
    load_jsonl,
    paper_sample_indices,
    select_split,
    write_jsonl,
)
from vislens.data.whatsup import SUBSETS, normalise_relation, parse_prompt
from vislens.errors import VislensError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PROMPTS = SHARED / "data" / "adaptvis-prompts"
VSR_DIR = SHARED / "data" / "vsr-zeroshot"

# Section 4 of dataset-formats.md: gold answer counts per question file.
REAL_COUNTS = {
    "controlled_a": {"Right": 103, "Left": 103, "On": 103, "Under": 103},
    "controlled_b": {"Right": 102, "Left": 102, "Front": 102, "Behind": 102},
    "vg_one": {"Right": 376, "Left": 392, "Top": 192, "Bottom": 198, "Behind": 2},
    "vg_two": {"Right": 137, "Left": 127, "Above": 3, "Behind": 5, "Front": 19},
    "coco_one": {"Right": 564, "Left": 576, "Top": 363, "Bottom": 744},
    "coco_two": {"Right": 129, "Left": 150, "Above": 86, "Below": 75},
}
PAPER_SAMPLE_SIZES = {"controlled_a": 82, "controlled_b": 81, "coco_one": 449,
                      "coco_two": 88, "vg_one": 232, "vg_two": 58}


def _need_shared() -> None:
    if not PROMPTS.is_dir() or not VSR_DIR.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")


def _real(subset: str) -> list[Sample]:
    _need_shared()
    return load_adaptvis_questions(PROMPTS / SUBSETS[subset].prompts_file)


# ---------------------------------------------------------------- real question files


def test_published_whatsup_prompts_offer_their_options():
    """Every published WhatsUp question offers its options as words; only the known quirk
    (VG two-object id 56: gold Above, prompt lists top/bottom) is flagged."""
    from vislens.capture import check_options_in_prompt

    flagged = [i for subset in SUBSETS for i in check_options_in_prompt(_real(subset))]
    assert flagged == ["vg_two-56"]


@pytest.mark.parametrize("subset", sorted(REAL_COUNTS))
def test_real_answer_counts_match_the_format_doc(subset: str) -> None:
    samples = _real(subset)
    assert Counter(s.answer for s in samples) == Counter(REAL_COUNTS[subset])
    assert [s.id for s in samples] == [f"{subset}-{i}" for i in range(len(samples))]
    assert len(paper_sample_indices(len(samples))) == PAPER_SAMPLE_SIZES[subset]


@pytest.mark.parametrize("subset", sorted(REAL_COUNTS))
def test_real_questions_are_plain_and_parsed(subset: str) -> None:
    samples = _real(subset)
    n_objects = 1 if subset.endswith("_one") else 2
    for s in samples:
        assert "<image>" not in s.question and "USER" not in s.question and "ASSISTANT" not in s.question
        assert s.question.startswith("Where ") and "  " not in s.question and "\n" not in s.question
        assert s.answer in s.options and s.image_path == ""
        assert len(s.objects) == n_objects and all(s.objects)
        assert s.relation == s.answer.lower()
        assert s.meta["prompt"].startswith("<image>")


def test_real_quirks_are_flagged() -> None:
    vg_two = {s.id: s for s in _real("vg_two")}
    odd = vg_two["vg_two-56"]
    assert odd.answer == "Above" and odd.meta["answer_not_in_options"] is True
    assert odd.options == ["Left", "Right", "Front", "Behind", "Top", "Bottom", "Above"]
    assert sum(bool(s.meta.get("answer_not_in_options")) for s in vg_two.values()) == 1
    for leak in ("vg_two-84", "vg_two-215"):  # the leaked caption states the gold answer
        assert "Option" not in vg_two[leak].question
        assert vg_two[leak].meta["dropped_prompt_text"].startswith("Option A photo of a man")
    vg_one = {s.id: s for s in _real("vg_one")}
    assert vg_one["vg_one-201"].options == ["Behind", "Front"] == vg_one["vg_one-1003"].options
    coco_two = _real("coco_two")
    assert {tuple(s.options) for s in coco_two} == {("Left", "Right", "Above", "Below")}


@pytest.mark.parametrize("subset,n_groups", [("controlled_a", 103), ("controlled_b", 102)])
def test_real_controlled_groups_are_complete(subset: str, n_groups: int) -> None:
    groups: dict[str, set[str]] = defaultdict(set)
    for s in _real(subset):
        groups[s.group].add(s.relation)
    assert len(groups) == n_groups
    assert {len(r) for r in groups.values()} == {4}


def test_real_vsr_zeroshot_counts() -> None:
    _need_shared()
    expected = {"train": (1799, 1690), "dev": (167, 173), "test": (629, 593)}
    for split, (yes, no) in expected.items():
        samples = load_dataset(f"vsr:{split}", VSR_DIR)
        assert Counter(s.answer for s in samples) == {"Yes": yes, "No": no}
        assert all(len(s.objects) == 2 and s.options == ["Yes", "No"] for s in samples)
    test = load_dataset("vsr:test", VSR_DIR)
    assert test[0].question == (
        "Determine whether the description about the spatial relationship is correct or not. "
        "Answer with yes or no: The car is behind the suitcase."
    )
    assert test[0].image_path == str(VSR_DIR.absolute() / "train2017" / "000000017697.jpg")
    assert Counter(Path(s.image_path).parent.name for s in test) == {"train2017": 1180, "val2017": 42}


def test_real_vsr_with_answer_is_the_true_test_rows() -> None:
    _need_shared()
    test = {s.id: s for s in load_dataset("vsr:test", VSR_DIR)}
    with_answer = load_adaptvis_questions(PROMPTS / "VSR_with_answer.jsonl")
    assert len(with_answer) == 629
    assert {s.id for s in with_answer} == {i for i, s in test.items() if s.answer == "Yes"}
    for s in with_answer:
        assert s.meta["open_ended"] and s.options == []
        assert s.relation == s.answer == test[s.id].relation
        assert s.objects == test[s.id].objects


_REL_TOKEN = {"On": "on", "Under": "under", "Left": "left_of", "Right": "right_of",
              "Front": "in-front_of", "Behind": "behind"}


@pytest.mark.parametrize("subset", ["controlled_a", "controlled_b"])
def test_real_prompts_pair_with_a_download(tmp_path: Path, subset: str) -> None:
    """Real question files + annotation JSONs written in the published grammar load cleanly."""
    questions = _real(subset)
    spec = SUBSETS[subset]
    records = [
        {"image_path": f"data/{spec.image_dir}/{q.objects[0].replace(' ', '-')}_"
                       f"{_REL_TOKEN[q.answer]}_{q.objects[1].replace(' ', '-')}.jpeg",
         "caption_options": ["a", "b", "c", "d"]}
        for q in questions
    ]
    (tmp_path / spec.annotation_file).write_text(json.dumps(records))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = load_dataset(f"whatsup:{subset}", tmp_path, prompts_dir=PROMPTS)
    assert len({s.group for s in samples}) == len(questions) // 4
    assert samples[0].image_path.startswith(str(tmp_path / spec.image_dir))


# ---------------------------------------------------------------- fake WhatsUp download


def _prompt(question: str, options: str) -> str:
    return f"<image>\nUSER: {question} Answer with {options}.\nASSISTANT:"


def _image(path: Path, color: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def _write_prompts(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": i, "question": q, "answer": [a]}) for i, (q, a) in enumerate(rows)]
    path.write_text("\n".join(lines))  # like the published files: no final newline


@pytest.fixture()
def whatsup_root(tmp_path: Path) -> Path:
    """A tiny download: one Controlled A group, two COCO one-object and two VG two-object records."""
    root = tmp_path / "whatsup"
    opts = "left, right, on or under"
    rels = [("on", "On"), ("under", "Under"), ("left_of", "Left"), ("right_of", "Right")]
    _write_prompts(root / "prompts" / SUBSETS["controlled_a"].prompts_file, [
        (_prompt("Where is the beer bottle in relation to the armchair?", opts), gold) for _, gold in rels
    ])
    records = [{"image_path": f"data/controlled_images/beer-bottle_{r}_armchair.jpeg",
                "caption_options": [f"A beer bottle {r} a armchair", "x", "y", "z"]} for r, _ in rels]
    (root / "controlled_images_dataset.json").write_text(json.dumps(records))
    for r, _ in rels:
        _image(root / "controlled_images" / f"beer-bottle_{r}_armchair.jpeg")

    _write_prompts(root / "prompts" / SUBSETS["coco_one"].prompts_file, [
        ("<image>\nUSER:  Where is the dining table in the photo? \nAnswer with left, right, top or bottom.\n\nASSISTANT:", "Bottom"),
        (_prompt("Where are the scissors in the photo?", "left, right, top or bottom"), "Left"),
    ])
    (root / "coco_qa_one_obj.json").write_text(json.dumps([
        [139, "A dining table on the bottom", "A dining table on the top"],
        [632, "Scissors on the left", "Scissors on the right"],
    ]))
    _image(root / "val2017" / "000000000139.jpg")

    _write_prompts(root / "prompts" / SUBSETS["vg_two"].prompts_file, [
        (_prompt("Where is the girl in relation to the pillow?", "left, right, front, behind, top, or bottom"), "Above"),
        ("<image>\nUSER: Where is the man in relation to the woman?\nAnswer with left, right, front, "
         "behind, above or below.\nOption A photo of a man to the right of a woman.\nASSISTANT:", "Right"),
    ])
    (root / "vg_qa_two_obj.json").write_text(json.dumps([[2345, "t", "f"], ["17", "t", "f"]]))
    return root


def test_fake_controlled_download(whatsup_root: Path) -> None:
    samples = load_dataset("whatsup:controlled_a", whatsup_root)
    assert [s.relation for s in samples] == ["on", "under", "left", "right"]
    first = samples[0]
    assert first.id == "controlled_a-0"
    assert first.image_path == str(whatsup_root / "controlled_images" / "beer-bottle_on_armchair.jpeg")
    assert first.question == "Where is the beer bottle in relation to the armchair? Answer with left, right, on or under."
    assert first.options == ["Left", "Right", "On", "Under"] and first.answer == "On"
    assert first.objects == ["beer bottle", "armchair"]
    assert {s.group for s in samples} == {"beer-bottle|armchair"}
    assert first.meta["annotation"]["image_path"].startswith("data/")
    assert check_images(samples) == []


def test_fake_coco_and_vg_download(whatsup_root: Path) -> None:
    coco = load_dataset("whatsup:coco_one", whatsup_root)
    assert coco[0].question == "Where is the dining table in the photo? Answer with left, right, top or bottom."
    assert coco[0].image_path == str(whatsup_root / "val2017" / "000000000139.jpg")
    assert coco[1].objects == ["scissors"] and coco[1].group == ""
    assert check_images(coco) == [("coco_one-1", f"missing: {whatsup_root / 'val2017' / '000000000632.jpg'}")]
    vg = load_dataset("whatsup:vg_two", whatsup_root, prompts_dir=whatsup_root / "prompts")
    assert vg[0].image_path == str(whatsup_root / "vg_images" / "2345.jpg")
    assert vg[0].options[-1] == "Above" and vg[0].meta["answer_not_in_options"] is True
    assert vg[1].image_path.endswith("17.jpg") and "Option" not in vg[1].question


def test_loading_never_opens_images(whatsup_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image was opened while loading")

    monkeypatch.setattr(Image, "open", boom)
    assert len(load_dataset("whatsup:controlled_a", whatsup_root)) == 4


def test_relation_mismatch_is_warned(whatsup_root: Path) -> None:
    path = whatsup_root / "controlled_images_dataset.json"
    records = json.loads(path.read_text())
    records[0], records[1] = records[1], records[0]
    path.write_text(json.dumps(records))
    with pytest.warns(UserWarning, match="2 of 4 image names disagree"):
        samples = load_dataset("whatsup:controlled_a", whatsup_root)
    assert samples[0].meta["relation_mismatch"] == "under"


def test_whatsup_errors_name_the_file(whatsup_root: Path) -> None:
    with pytest.raises(VislensError, match=r"VG_QA_one_obj_with_answer_six_options\.jsonl: AdaptVis question file not found"):
        load_dataset("whatsup:vg_one", whatsup_root)
    _write_prompts(whatsup_root / "prompts" / SUBSETS["vg_one"].prompts_file,
                   [(_prompt("Where is the dog in the photo?", "left, right, front, behind, top or bottom"), "Top")])
    with pytest.raises(VislensError, match=r"vg_qa_one_obj\.json: WhatsUp annotation file not found"):
        load_dataset("whatsup:vg_one", whatsup_root)

    annotations = whatsup_root / "coco_qa_one_obj.json"
    annotations.write_text(json.dumps([[139, "a", "b"]]))
    with pytest.raises(VislensError, match=r"COCO_QA_one_obj.*has 2 questions but .*coco_qa_one_obj\.json has 1 records"):
        load_dataset("whatsup:coco_one", whatsup_root)
    annotations.write_text("[[139, ")
    with pytest.raises(VislensError, match=r"coco_qa_one_obj\.json: malformed JSON \(line 1"):
        load_dataset("whatsup:coco_one", whatsup_root)
    annotations.write_text(json.dumps([[139, "a", "b"], {"image": 1}]))
    with pytest.raises(VislensError, match=r"coco_qa_one_obj\.json: entry 1: expected \[image_id"):
        load_dataset("whatsup:coco_one", whatsup_root)

    prompts = whatsup_root / "prompts" / SUBSETS["coco_one"].prompts_file
    prompts.write_text(prompts.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(VislensError, match=r"COCO_QA_one_obj_with_answer_four_options\.jsonl:2: malformed JSON line"):
        load_dataset("whatsup:coco_one", whatsup_root)

    bad = json.loads((whatsup_root / "controlled_images_dataset.json").read_text())
    bad[2]["image_path"] = "data/controlled_images/beer-bottle.jpeg"
    (whatsup_root / "controlled_images_dataset.json").write_text(json.dumps(bad))
    with pytest.raises(VislensError, match=r"controlled_images_dataset\.json: entry 2: image name 'beer-bottle'"):
        load_dataset("whatsup:controlled_a", whatsup_root)


def test_dataset_names_and_errors(tmp_path: Path) -> None:
    assert "whatsup:controlled_a" in DATASET_NAMES and "vsr:test" in DATASET_NAMES
    with pytest.raises(VislensError) as info:
        load_dataset("whatsup:controlled_c", tmp_path)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in DATASET_NAMES) and "jsonl:PATH" in message
    with pytest.raises(VislensError, match="needs --data-root"):
        load_dataset("vsr:test")
    with pytest.raises(VislensError, match="jsonl: needs a path"):
        load_dataset("jsonl:")


def test_a_registered_dataset_loads_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a benchmark is one registry entry: load_dataset finds it, errors list it."""
    import vislens.data as vd
    from vislens.registry import Registry

    registry = Registry("dataset")
    for name, loader in vd.DATASETS.items():
        registry.add(name, loader)
    monkeypatch.setattr(vd, "DATASETS", registry)
    calls = []
    mine = [Sample(id="m0", image_path="", question="q?", options=["Left", "Right"], answer="Left")]
    registry.add("mine:all", lambda root, prompts_dir: calls.append((root, prompts_dir)) or mine)
    assert load_dataset("mine:all", tmp_path, prompts_dir="p") == mine
    assert calls == [(tmp_path, "p")]
    with pytest.raises(VislensError, match=r"unknown dataset 'mine:none' \(valid: .*vsr:test, mine:all, jsonl:PATH\)"):
        load_dataset("mine:none", tmp_path)
    assert vd.DATASET_NAMES == tuple(n for n in registry.names() if n != "mine:all")


def test_parse_prompt_and_relations() -> None:
    parsed = parse_prompt("<image>\nUSER: Where are the cups in relation to the plate? \n\nAnswer with left, right, on, or under..\n\nASSISTANT:")
    assert parsed.question == "Where are the cups in relation to the plate? Answer with left, right, on, or under.."
    assert parsed.options == ["Left", "Right", "On", "Under"] and parsed.objects == ["cups", "plate"]
    assert [normalise_relation(t) for t in ("in-front_of", "left_of", "Right", "in front of")] == [
        "front", "left", "right", "front"]
    with pytest.raises(ValueError):
        normalise_relation("next to")



@pytest.mark.parametrize("clause,options", [
    ("Answer with left, right, on or under", ["Left", "Right", "On", "Under"]),  # no full stop
    ("answer with left or right.", ["Left", "Right"]),  # lower case
    ("Answer with left/right/on/under.", ["Left", "Right", "On", "Under"]),
])
def test_parse_prompt_options_by_hand(clause: str, options: list[str]) -> None:
    """Options were [] (no full stop, lower case) or one "Left/right/on/under" option; the
    loader then made the gold answer the only option and called it a published quirk."""
    parsed = parse_prompt(f"<image>\nUSER: Where is the cup in relation to the plate? {clause}\nASSISTANT:")
    assert parsed.options == options and parsed.objects == ["cup", "plate"]
    assert parsed.question == f"Where is the cup in relation to the plate? {clause}"


def test_lower_case_gold_is_the_offered_option(tmp_path: Path) -> None:
    """Gold "left" with "Answer with left or right." is offered (options are capitalised):
    it was appended as a third option "left" and flagged as not offered."""
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": 0, "question": _prompt("Where is the cup in relation to the plate?",
                                                             "left or right"), "answer": ["left"]}))
    (s,) = load_adaptvis_questions(path)
    assert s.options == ["Left", "Right"] and s.answer == "Left" and s.relation == "left"
    assert "answer_not_in_options" not in s.meta


def test_question_file_without_options_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "Controlled_Images_A_with_answer_four_options.jsonl"
    good = {"id": 0, "question": _prompt("Where is the cup in relation to the plate?", "left or right"),
            "answer": ["Left"]}
    bad = {"id": 1, "question": "<image>\nUSER: Where is the cup in relation to the plate?\nASSISTANT:",
           "answer": ["Left"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad))
    with pytest.raises(VislensError) as info:
        load_adaptvis_questions(path)
    assert str(info.value).startswith(f"{path}:2: field 'question': ") and "Answer with" in str(info.value)


# ---------------------------------------------------------------- VSR


def _vsr_row(image: str, folder: str, label: int, caption: str = "The cat is on the bed.") -> dict:
    return {"image": image, "image_link": f"http://images.cocodataset.org/{folder}/{image}",
            "caption": caption, "label": label, "relation": "on", "subj": "cat", "obj": "bed",
            "annotator_id": 1, "vote_true_validator_id": "[1, 2]", "vote_false_validator_id": "[]"}


def test_vsr_fixture(tmp_path: Path) -> None:
    rows = [_vsr_row("000000000001.jpg", "train2017", 1), _vsr_row("000000000002.jpg", "val2017", 0),
            _vsr_row("000000000003.jpg", "train2017", 1)]
    (tmp_path / "vsr").mkdir()
    (tmp_path / "vsr" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    _image(tmp_path / "images" / "000000000003.jpg")  # flat-folder fallback
    samples = load_dataset("vsr:dev", tmp_path)
    assert [s.id for s in samples] == ["vsr-dev-0", "vsr-dev-1", "vsr-dev-2"]
    assert [s.answer for s in samples] == ["Yes", "No", "Yes"]
    assert samples[0].question.endswith("Answer with yes or no: The cat is on the bed.")
    assert samples[0].objects == ["cat", "bed"] and samples[0].relation == "on"
    assert samples[0].image_path == str(tmp_path / "train2017" / "000000000001.jpg")
    assert samples[1].image_path == str(tmp_path / "val2017" / "000000000002.jpg")
    assert samples[2].image_path == str(tmp_path / "images" / "000000000003.jpg")
    assert [i for i, _ in check_images(samples)] == ["vsr-dev-0", "vsr-dev-1"]


def test_vsr_flat_layout_and_errors(tmp_path: Path) -> None:
    with pytest.raises(VislensError, match=r"tried .*vsr/test\.jsonl and .*test\.jsonl"):
        load_dataset("vsr:test", tmp_path)
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(_vsr_row("a.jpg", "train2017", 1)) + "\n" + json.dumps(_vsr_row("b.jpg", "train2017", 2)))
    with pytest.raises(VislensError, match=r"test\.jsonl:2: field 'label': expected 0 or 1"):
        load_dataset("vsr:test", tmp_path)
    row = _vsr_row("b.jpg", "train2017", 0)
    del row["caption"]
    path.write_text(json.dumps(row))
    with pytest.raises(VislensError, match=r"test\.jsonl:1: field 'caption': required"):
        load_dataset("vsr:test", tmp_path)


# ---------------------------------------------------------------- generic JSONL


def _samples(folder: Path) -> list[Sample]:
    return [
        Sample(id="s1", image_path=str(folder / "img" / "a.png"), question="Where is the cup?",
               options=["Left", "Right"], answer="Left", relation="left", group="cup|plate",
               objects=["cup", "plate"], boxes=[Box("cup", (1.0, 2.0, 5.0, 6.5)), Box("plate", (0, 0, 8, 6))],
               split="val", meta={"source": "synthetic", "seed": 3}),
        Sample(id="s2", image_path="", question="Is it?", options=["Yes", "No"], answer="No"),
    ]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    path = write_jsonl(samples, tmp_path / "out" / "data.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["image"] == "../img/a.png"
    assert set(json.loads(path.read_text().splitlines()[1])) == {"id", "image", "question", "options", "answer"}
    loaded = load_dataset(f"jsonl:{path}")
    expected = _samples(tmp_path)
    expected[0].boxes = [Box("cup", (1.0, 2.0, 5.0, 6.5)), Box("plate", (0.0, 0.0, 8.0, 6.0))]
    expected[0].given_split = "val"  # a written split is the record's own split when read back
    assert loaded == expected
    assert not (tmp_path / "out" / "data.jsonl.tmp").exists()


def test_jsonl_write_rejects_bad_samples(tmp_path: Path) -> None:
    bad = Sample(id="x", image_path="", question="q", options=["A"], answer="B")
    with pytest.raises(VislensError, match="sample 'x': answer 'B' is not one of options"):
        write_jsonl([bad], tmp_path / "x.jsonl")
    unserialisable = Sample(id="y", image_path="", question="q", options=["A"], answer="A", meta={"f": object()})
    with pytest.raises(VislensError, match="sample 'y': cannot write"):
        write_jsonl([unserialisable], tmp_path / "y.jsonl")
    assert not (tmp_path / "y.jsonl").exists()


_GOOD = {"id": "a", "image": "a.png", "question": "q?", "options": ["Left", "Right"], "answer": "Left"}


@pytest.mark.parametrize(
    "change,field,problem",
    [
        ({"answer": "Up"}, "answer", "'Up' is not one of options"),
        ({"question": None}, "question", "expected a string"),
        ({"options": "Left"}, "options", "list of non-empty strings"),
        # scored case-insensitively (option_token_ids counts "Left" and "left" as one answer)
        ({"options": ["Left", "Right", "left"]}, "options", "'left' repeats 'Left'"),
        ({"options": ["Left", "Right", "Left"]}, "options", "'Left' repeats 'Left'"),
        ({"boxs": []}, "boxs", "unknown field"),
        ({"boxes": [{"label": "cup", "xyxy": [1, 2, 3]}]}, "boxes.xyxy", "4 finite numbers"),
        ({"boxes": [{"label": "cup", "xyxy": [1, 2, 3, float("nan")]}]}, "boxes.xyxy", "4 finite numbers"),
        ({"boxes": [{"label": "cup", "xyxy": [5, 2, 3, 4]}]}, "boxes.xyxy", "x0 < x1"),
        ({"boxes": [{"label": "cup", "xyxy": [1, 4, 3, 4]}]}, "boxes.xyxy", "y0 < y1"),
        ({"boxes": [{"label": "", "xyxy": [1, 2, 3, 4]}]}, "boxes.label", "non-empty"),
        ({"meta": [1]}, "meta", "JSON object"),
        ({"split": "train"}, "split", "'train' is not a split vislens knows"),
        ({"split": "all"}, "split", "'all' is not a split vislens knows"),
        ({"split": ""}, "split", "'' is not a split vislens knows"),
        ({"split": 1}, "split", "1 is not a split vislens knows"),
    ],
)
def test_jsonl_field_errors_name_file_line_and_field(tmp_path: Path, change: dict, field: str, problem: str) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({**_GOOD, "id": "ok"}) + "\n" + json.dumps({**_GOOD, **change}, allow_nan=True) + "\n")
    with pytest.raises(VislensError) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:2: field '{field}': ")
    assert problem in str(info.value)


def test_jsonl_structural_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    missing = {k: v for k, v in _GOOD.items() if k != "image"}
    cases = [
        (json.dumps(missing), f"{path}:1: field 'image': required field is missing"),
        ("{bad json", f"{path}:1: malformed JSON line"),
        ("[1, 2]", f"{path}:1: expected a JSON object"),
        (json.dumps(_GOOD) + "\n" + json.dumps(_GOOD), f"{path}:2: field 'id': duplicate id 'a' (first on line 1)"),
        ("\n\n", f"{path}: no samples"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(VislensError) as info:
            load_jsonl(path)
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(VislensError, match=r"nope\.jsonl: file not found"):
        load_dataset(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_non_utf8_bytes_name_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(_GOOD).encode()
    bad = json.dumps({**_GOOD, "id": "b", "question": "caf\u00e9?"}, ensure_ascii=False)
    path.write_bytes(good + b"\n\n" + bad.encode("latin-1") + b"\n")
    col = bad.encode("latin-1").index(b"\xe9") + 1
    with pytest.raises(VislensError) as info:
        load_dataset(f"jsonl:{path}")
    assert str(info.value) == (f"{path}:3: not UTF-8 text (byte 0xe9 at column {col}); "
                               f"save the file as UTF-8")
    path.write_bytes(good + b"\n" + bad.encode("utf-8") + b"\n")  # the same text as UTF-8 loads
    assert [s.question for s in load_jsonl(path)] == [_GOOD["question"], "caf\u00e9?"]


def test_whatsup_annotations_not_utf8(whatsup_root: Path) -> None:
    annotations = whatsup_root / "coco_qa_one_obj.json"
    annotations.write_bytes(b'[[139, "a", "b"],\n [632, "na\xefve", "b"]]')
    with pytest.raises(VislensError, match=r"coco_qa_one_obj\.json:2: not UTF-8 text \(byte 0xef at column 11\)"):
        load_dataset("whatsup:coco_one", whatsup_root)


# ---------------------------------------------------------------- splits


def _plain(n: int) -> list[Sample]:
    return [Sample(id=f"x{i}", image_path="", question="q", options=["A"], answer="A") for i in range(n)]


def test_splits_are_deterministic_and_order_free() -> None:
    samples = _plain(101)
    assign_splits(samples, 0.2, seed=7)
    first = {s.id: s.split for s in samples}
    shuffled = _plain(101)
    random.Random(0).shuffle(shuffled)
    assign_splits(shuffled, 0.2, seed=7)
    assert {s.id: s.split for s in shuffled} == first
    assert sum(v == "val" for v in first.values()) == math.floor(0.2 * 101) == 20
    assign_splits(shuffled, 0.2, seed=8)
    assert {s.id: s.split for s in shuffled} != first
    assert [s.id for s in select_split(samples, "val")] == [s.id for s in samples if first[s.id] == "val"]
    assert len(select_split(samples, "test")) == 81 and len(select_split(samples, "all")) == 101


def test_splits_keep_groups_whole() -> None:
    samples = _plain(400)
    for s in samples:
        s.group = f"g{int(s.id[1:]) // 4}"
    assign_splits(samples, 0.2, seed=0)
    by_group: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        by_group[s.group].add(s.split)
    assert all(len(v) == 1 for v in by_group.values())
    assert len(select_split(samples, "val")) == 80
    assign_splits(samples, 0.2, seed=0, keep_groups=False)
    assert len(select_split(samples, "val")) == 80


def test_split_errors() -> None:
    samples = _plain(3)
    with pytest.raises(VislensError, match="call assign_splits first"):
        select_split(samples, "val")
    with pytest.raises(VislensError, match="unknown split 'train'"):
        select_split(samples, "train")  # type: ignore[arg-type]
    with pytest.raises(VislensError, match="val_fraction"):
        assign_splits(samples, 1.5)
    with pytest.raises(VislensError, match="duplicated: 'x0'"):
        assign_splits(samples + _plain(1))


def test_a_jsonl_split_field_decides_and_the_rest_are_hashed(tmp_path: Path) -> None:
    # records 0-9 name their split (every third one test); 10-49 have none
    named = {f"x{i}": ("test" if i % 3 == 0 else "val") for i in range(10)}
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({**_GOOD, "id": f"x{i}", **({"split": named[f"x{i}"]}
                                        if f"x{i}" in named else {})}) + "\n" for i in range(50)))
    samples = load_jsonl(path)
    assign_splits(samples, 0.2, seed=4)
    got = {s.id: s.split for s in samples}
    assert {i: got[i] for i in named} == named  # the file decides, whatever the seed or fraction
    # the other 40 are split as if alone: 20 % of them by hash (reference: the plain samples)
    rest = [s for s in _plain(50) if s.id not in named]
    assign_splits(rest, 0.2, seed=4)
    assert {s.id: got[s.id] for s in rest} == {s.id: s.split for s in rest}
    assert sum(got[s.id] == "val" for s in rest) == 8
    assign_splits(samples, 1.0, seed=9)
    assert {i: s.split for s in samples for i in [s.id] if i in named} == named
    assert all(s.split == "val" for s in samples if s.id not in named)
    assert [s.id for s in select_split(samples, "test")] == [i for i, v in named.items() if v == "test"]


def test_a_named_split_takes_its_group_along() -> None:
    samples = _plain(40)
    for s in samples:
        s.group = f"g{int(s.id[1:]) // 4}"
    samples[0].given_split = "test"  # group g0 (x0-x3) follows x0
    samples[4].given_split = samples[6].given_split = samples[7].given_split = "val"
    samples[5].given_split = "test"  # g1: every sample names its own, in both splits
    assign_splits(samples, 0.5, seed=0)
    assert [s.split for s in samples[:8]] == ["test"] * 4 + ["val", "test", "val", "val"]
    free_groups = {s.group: s.split for s in samples[8:]}
    assert set(free_groups.values()) == {"val", "test"}
    assert sum(v == "val" for v in free_groups.values()) == 4  # half of the 8 free groups
    samples[7].given_split = ""  # x7 would join g1, which names both splits: ambiguous
    with pytest.raises(VislensError, match=r"sample 'x7' names no split, but its group 'g1'"):
        assign_splits(samples, 0.5, seed=0)
    assign_splits(samples, 0.5, seed=0, keep_groups=False)  # without groups x7 is hashed
    assert samples[7].split in ("val", "test") and samples[1].split in ("val", "test")


def test_select_samples_honours_the_split_field(tmp_path: Path) -> None:
    from vislens.capture import select_samples

    path = tmp_path / "mine.jsonl"
    splits = ["val", "test", None, "val", "val", None, "val", None, None, "val"]
    path.write_text("".join(json.dumps({**_GOOD, "id": f"r{i}", **({"split": v} if v else {})}) + "\n"
                            for i, v in enumerate(splits)))
    val, _ = select_samples(f"jsonl:{path}", None, split="val", split_seed=3)
    test, _ = select_samples(f"jsonl:{path}", None, split="test", split_seed=3)
    ids = {s.id: ("val" if s in val else "test") for s in val + test}
    # 5 named val records: more than a 20 % hash split of 10 could give
    assert {i: ids[f"r{i}"] for i, v in enumerate(splits) if v} == {i: v for i, v in enumerate(splits) if v}
    # the 4 free records: floor(0.2 * 4) = 0 of them in val
    assert sum(ids[f"r{i}"] == "val" for i, v in enumerate(splits) if not v) == 0
    assert len(val) == 5 and len(test) == 5


def test_paper_sample_indices_match_the_global_random_recipe() -> None:
    state = random.getstate()
    try:
        for n in (412, 291, 10):
            random.seed(1)
            expected = sorted(random.sample(range(n), int(0.2 * n)))
            assert paper_sample_indices(n) == expected
    finally:
        random.setstate(state)


# ---------------------------------------------------------------- check_images


def test_check_images_reports_missing_and_corrupt(tmp_path: Path) -> None:
    good, corrupt = tmp_path / "good.png", tmp_path / "corrupt.jpg"
    _image(good)
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    samples = [
        Sample(id="ok", image_path=str(good), question="q", options=["A"], answer="A"),
        Sample(id="gone", image_path=str(tmp_path / "gone.jpg"), question="q", options=["A"], answer="A"),
        Sample(id="bad", image_path=str(corrupt), question="q", options=["A"], answer="A"),
        Sample(id="bad2", image_path=str(corrupt), question="q", options=["A"], answer="A"),
        Sample(id="none", image_path="", question="q", options=["A"], answer="A"),
    ]
    problems = dict(check_images(samples))
    assert set(problems) == {"gone", "bad", "bad2", "none"}
    assert problems["gone"] == f"missing: {tmp_path / 'gone.jpg'}"
    assert problems["bad"].startswith(f"corrupt: {corrupt}") and problems["bad2"] == problems["bad"]
    assert problems["none"] == "no image path"


def test_check_images_reports_a_truncated_jpeg(tmp_path: Path) -> None:
    """A JPEG cut short (an interrupted download) passes Pillow's verify(), which checks no
    JPEG data, but fails when decoded: the capture stopped at it after loading the model.
    Reference: the capture's own reader (open_image) refuses the same file."""
    from vislens.capture import open_image

    rng = np.random.default_rng(0)
    full, cut = tmp_path / "full.jpg", tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(full, quality=90)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    samples = [Sample(id=p.stem, image_path=str(p), question="q", options=["A"], answer="A")
               for p in (full, cut)]
    open_image(samples[0])
    with pytest.raises(VislensError, match="truncated"):
        open_image(samples[1])
    problems = check_images(samples)
    assert [sid for sid, _ in problems] == ["cut"]
    assert problems[0][1].startswith(f"corrupt: {cut} (") and "truncated" in problems[0][1]


_EPS = "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


@pytest.fixture
def ghostscript_calls(monkeypatch):
    """Records every time Pillow would start Ghostscript (an external PostScript interpreter)."""
    from PIL import EpsImagePlugin

    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", record)
    return calls


def test_postscript_posing_as_a_photo_never_reaches_ghostscript(tmp_path, ghostscript_calls):
    """A dataset's ``cat.jpg`` that is really EPS: every reader refuses it in one line (or,
    where a missing image is tolerated, treats it as unreadable); Ghostscript never starts."""
    from vislens import boxes, capture, distributed, plots

    evil = tmp_path / "cat.jpg"
    evil.write_text(_EPS)
    sample = Sample(id="s0", image_path=str(evil), question="?", options=["a", "b"], answer="a")
    [(sid, reason)] = check_images([sample])
    assert sid == "s0" and reason.startswith("corrupt:")
    for call in (lambda: capture.open_image(sample),
                 lambda: distributed.decode_image(evil.read_bytes(), str(evil), "s0")):
        with pytest.raises(VislensError, match="cannot decode image") as info:
            call()
        assert "\n" not in str(info.value) and str(evil) in str(info.value)
    assert capture._image_size(sample) is None and boxes._header_size(str(evil)) is None
    assert plots._load_grey(str(evil), tmp_path) is None
    with pytest.raises(Exception):
        boxes._read_rgb(str(evil))
    assert ghostscript_calls == []


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("GIF", ".gif"),
                                        ("WEBP", ".webp"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                                        ("PPM", ".ppm")])
def test_ordinary_image_formats_still_open(tmp_path, fmt, suffix):
    from vislens import capture

    rng = random.Random(3)
    img = Image.new("RGB", (7, 5))
    img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(35)])
    path = tmp_path / f"x{suffix}"
    img.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    sample = Sample(id="s", image_path=str(path), question="?", options=["a"], answer="a")
    assert check_images([sample]) == []
    got = capture.open_image(sample)
    assert got.size == (7, 5)
    if fmt not in ("JPEG", "GIF"):  # lossless formats give the pixels back exactly
        assert list(got.getdata()) == list(img.getdata())
