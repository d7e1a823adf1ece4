"""WhatsUp (Kamath et al. 2023) with the AdaptVis question files.

A WhatsUp download (``--data-root DIR``) holds the annotation JSONs and image folders
directly under ``DIR`` and the AdaptVis question files under ``DIR/prompts/``. The question
files carry the question text and the gold answer; the annotation JSONs carry the image.
AdaptVis pairs them by position (question line i <-> annotation entry i), and so do we.

The question files are LLaVA-1.5 chat prompts, hand-edited and not uniform (see
``/work/shared/docs/dataset-formats.md``); :func:`parse_prompt` reduces each one to the
plain question, the listed options and the object names.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import VislensError
from .base import Sample
from .jsonl import decode_utf8, iter_jsonl

__all__ = [
    "SUBSETS",
    "WhatsUpSubset",
    "ParsedPrompt",
    "parse_prompt",
    "normalise_relation",
    "load_adaptvis_questions",
    "load_whatsup",
]


@dataclass(frozen=True)
class WhatsUpSubset:
    """Where one WhatsUp subset lives in a download and how its annotation records look."""

    name: str
    annotation_file: str
    prompts_file: str
    image_dir: str
    controlled: bool  # True: {"image_path", "caption_options"}; False: [image_id, true, false]


SUBSETS: dict[str, WhatsUpSubset] = {
    s.name: s
    for s in (
        WhatsUpSubset("controlled_a", "controlled_images_dataset.json",
                      "Controlled_Images_A_with_answer_four_options.jsonl", "controlled_images", True),
        WhatsUpSubset("controlled_b", "controlled_clevr_dataset.json",
                      "Controlled_Images_B_with_answer_four_options.jsonl", "controlled_clevr", True),
        WhatsUpSubset("coco_one", "coco_qa_one_obj.json",
                      "COCO_QA_one_obj_with_answer_four_options.jsonl", "val2017", False),
        WhatsUpSubset("coco_two", "coco_qa_two_obj.json",
                      "COCO_QA_two_obj_with_answer_four_options.jsonl", "val2017", False),
        WhatsUpSubset("vg_one", "vg_qa_one_obj.json",
                      "VG_QA_one_obj_with_answer_six_options.jsonl", "vg_images", False),
        WhatsUpSubset("vg_two", "vg_qa_two_obj.json",
                      "VG_QA_two_obj_with_answer_six_options.jsonl", "vg_images", False),
    )
}

# The AdaptVis file of the 629 true VSR test rows (never read by the reference code).
_VSR_PROMPTS_FILE = "VSR_with_answer.jsonl"

_RELATIONS = ("left", "right", "on", "under", "front", "behind", "top", "bottom", "above", "below")
_WS = re.compile(r"\s+")
_TEMPLATE = re.compile(r"USER:(?P<body>.*?)ASSISTANT:", re.S)
# "... Answer with left, right, on or under." plus whatever follows (a leaked caption in 2 files);
# any case, ended by full stops, a question mark or the end of the prompt.
_ANSWER_WITH = re.compile(
    r"^(?P<question>.*?\banswer with (?P<options>[^.?]*?)\s*(?:[.?]+|$))\s*(?P<rest>.*)$", re.S | re.I)
_TWO_OBJECTS = re.compile(r"\bWhere (?:is|are) the (?P<a>.+?) in relation to (?:the )?(?P<b>.+?)\s*\?")
_ONE_OBJECT = re.compile(r"\bWhere (?:is|are) the (?P<a>.+?) in the photo\s*\?")
_OPTION_SPLIT = re.compile(r"\s*,\s*(?:or\s+)?|\s+or\s+|\s*/\s*")
_OPEN_ENDED = re.compile(r"one word or (?:a )?(?:short )?phrase", re.I)


def normalise_relation(text: str) -> str:
    """Map a relation spelling (``Left``, ``left_of``, ``in-front_of``, ``in front of``) to
    one of left/right/on/under/front/behind/top/bottom/above/below; ValueError otherwise."""
    words = text.lower().replace("_", " ").replace("-", " ").split()
    while words and words[0] in ("to", "the", "in", "at"):
        words = words[1:]
    while words and words[-1] == "of":
        words = words[:-1]
    rel = " ".join(words)
    if rel not in _RELATIONS:
        raise ValueError(f"unknown relation {text!r}")
    return rel


@dataclass
class ParsedPrompt:
    """What :func:`parse_prompt` extracts from one chat-template prompt."""

    question: str
    options: list[str]
    objects: list[str]
    dropped: str = ""  # text after the "Answer with ..." sentence, removed from ``question``
    open_ended: bool = False


def _normalise_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def parse_options(text: str) -> list[str]:
    """``"left, right, above, or below"`` -> ``["Left", "Right", "Above", "Below"]``."""
    return [word.strip().capitalize() for word in _OPTION_SPLIT.split(text.strip()) if word.strip()]


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Reduce an AdaptVis prompt to its plain question, options and object names.

    ``question`` is the text between ``USER:`` and ``ASSISTANT:`` with whitespace normalised,
    cut after the "Answer with ...." sentence: two VG two-object lines (ids 84, 215) append a
    caption that states the gold answer ("Option A photo of a man to the right of a woman."),
    which is returned in ``dropped`` instead. Prompts without the chat template are used whole
    (minus ``<image>``). "Answer with one word or phrase." gives ``open_ended`` and no options.
    """
    match = _TEMPLATE.search(prompt)
    body = match.group("body") if match else prompt.replace("<image>", "")
    body = _normalise_ws(body)
    question, options, dropped, open_ended = body, [], "", False
    answer_with = _ANSWER_WITH.match(body)
    if answer_with:
        question = answer_with.group("question")
        dropped = answer_with.group("rest")
        if _OPEN_ENDED.fullmatch(answer_with.group("options").strip()):
            open_ended = True
        else:
            options = parse_options(answer_with.group("options"))
    two = _TWO_OBJECTS.search(question)
    one = None if two else _ONE_OBJECT.search(question)
    objects = [two.group("a"), two.group("b")] if two else [one.group("a")] if one else []
    return ParsedPrompt(question=question, options=options, objects=objects,
                        dropped=dropped, open_ended=open_ended)


def _subset_for_file(path: Path) -> str:
    for subset in SUBSETS.values():
        if subset.prompts_file == path.name:
            return subset.name
    return "vsr" if path.name == _VSR_PROMPTS_FILE else path.stem.lower()


def _gold(obj: dict[str, Any], where: str) -> str:
    answer = obj.get("answer")
    if isinstance(answer, list) and answer and isinstance(answer[0], str):
        return answer[0]
    if isinstance(answer, str) and answer:
        return answer
    raise VislensError(f"{where}: field 'answer': expected a string or a non-empty list of strings")


def _question_sample(obj: dict[str, Any], where: str, subset: str, path: Path) -> Sample:
    """One Sample from a question-file line, without an image."""
    prompt = obj.get("question")
    if not isinstance(prompt, str):
        raise VislensError(f"{where}: field 'question': expected a string")
    line_id = obj.get("id")
    if not isinstance(line_id, int) or isinstance(line_id, bool):
        raise VislensError(f"{where}: field 'id': expected an integer")
    parsed = parse_prompt(prompt)
    if not parsed.options and not parsed.open_ended:
        raise VislensError(f'{where}: field \'question\': no "Answer with ..." sentence listing '
                           "the options (e.g. \"Answer with left, right, on or under.\")")
    gold = _gold(obj, where)
    meta: dict[str, Any] = {"prompt": prompt, "prompt_id": line_id, "prompts_file": str(path)}
    if parsed.dropped:
        meta["dropped_prompt_text"] = parsed.dropped
    options = list(parsed.options)
    if parsed.open_ended:
        meta["open_ended"] = True
        relation = gold
    else:
        # the options are capitalised from the prompt: "left" is the offered "Left"
        gold = next((o for o in options if o.lower() == gold.lower()), gold)
        if gold not in options:
            meta["answer_not_in_options"] = True
            options.append(gold)
        try:
            relation = normalise_relation(gold)
        except ValueError:
            relation = gold.lower()
    sample_id = f"vsr-test-{line_id}" if subset == "vsr" else f"{subset}-{line_id}"
    group = "|".join(parsed.objects) if subset in ("controlled_a", "controlled_b") else ""
    return Sample(id=sample_id, image_path="", question=parsed.question, options=options,
                  answer=gold, relation=relation, group=group, objects=list(parsed.objects),
                  meta=meta)


def load_adaptvis_questions(path: str | Path) -> list[Sample]:
    """Load an AdaptVis question file alone (no images: ``image_path`` is empty).

    Ids are ``{subset}-{line id}`` (e.g. ``controlled_a-0``; ``vsr-test-{id}`` for
    ``VSR_with_answer.jsonl``, matching the ``vsr:test`` ids). Without file names,
    Controlled A/B groups come from the question's object names (``"beer bottle|armchair"``).
    """
    path = Path(path)
    subset = _subset_for_file(path)
    samples = [_question_sample(obj, f"{path}:{lineno}", subset, path) for lineno, obj in iter_jsonl(path)]
    if not samples:
        raise VislensError(f"{path}: no questions (empty file)")
    return samples


def _read_annotations(path: Path) -> list[Any]:
    if not path.is_file():
        raise VislensError(
            f"{path}: WhatsUp annotation file not found (download it into the --data-root folder)"
        )
    try:
        data = json.loads(decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as exc:
        raise VislensError(f"{path}: malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, list):
        raise VislensError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _strip_data_prefix(image_path: str) -> PurePosixPath:
    """``data/controlled_images/x.jpeg`` -> ``controlled_images/x.jpeg`` (relative to DIR)."""
    parts = [p for p in PurePosixPath(image_path.replace("\\", "/")).parts if p != "."]
    if parts and parts[0] == "data":
        parts = parts[1:]
    return PurePosixPath(*parts)


def _controlled_image(record: Any, where: str) -> str:
    ok = isinstance(record, dict) and isinstance(record.get("image_path"), str) and record["image_path"]
    if not ok:
        raise VislensError(f'{where}: expected {{"image_path": str, "caption_options": [...]}}')
    return record["image_path"]


def _qa_image_id(record: Any, where: str) -> str:
    ok = isinstance(record, list) and len(record) >= 3 and isinstance(record[0], (int, str))
    if not ok or isinstance(record[0], bool):
        raise VislensError(f"{where}: expected [image_id, true_caption, false_caption]")
    return str(record[0])


def controlled_name_parts(image_path: str, where: str) -> tuple[str, str, str]:
    """``beer-bottle_on_armchair.jpeg`` -> ``("beer-bottle", "on", "armchair")`` (file-name grammar)."""
    stem = PurePosixPath(image_path.replace("\\", "/")).stem
    parts = stem.split("_")
    if len(parts) < 3:
        raise VislensError(f"{where}: image name {stem!r} does not follow {{subj}}_{{rel}}_{{obj}}")
    try:
        relation = normalise_relation(parts[1])
    except ValueError:
        raise VislensError(f"{where}: image name {stem!r} has unknown relation {parts[1]!r}") from None
    return parts[0], relation, parts[-1]


def _image_path(subset: WhatsUpSubset, record: Any, root: Path, where: str) -> str:
    if subset.controlled:
        raw = _controlled_image(record, where)
        rel = PurePosixPath(raw) if PurePosixPath(raw).is_absolute() else _strip_data_prefix(raw)
        return str(root / rel)
    image_id = _qa_image_id(record, where)
    name = f"{image_id.zfill(12)}.jpg" if subset.image_dir == "val2017" else f"{image_id}.jpg"
    return str(root / subset.image_dir / name)


def _attach_image(sample: Sample, subset: WhatsUpSubset, record: Any, root: Path, where: str) -> bool:
    """Set image path, group and the raw annotation; return False on a relation mismatch."""
    sample.image_path = _image_path(subset, record, root, where)
    sample.meta["annotation"] = record
    if not subset.controlled:
        return True
    subj, relation, obj = controlled_name_parts(record["image_path"], where)
    sample.group = f"{subj}|{obj}"
    if relation != sample.relation:
        sample.meta["relation_mismatch"] = relation
        return False
    return True


def load_whatsup(subset: str, data_root: str | Path, prompts_dir: str | Path | None = None) -> list[Sample]:
    """Load one WhatsUp subset (``controlled_a``, ..., ``vg_two``) from a download folder.

    Question line i is paired with annotation entry i, as AdaptVis does; counts must match.
    For Controlled A/B the relation in the image name is checked against the gold answer: a
    disagreement (a sign of mis-ordered files) is warned about and kept in
    ``meta["relation_mismatch"]``. Images are not opened (see ``check_images``).
    """
    if subset not in SUBSETS:
        raise VislensError(f"unknown WhatsUp subset {subset!r} (valid: {', '.join(SUBSETS)})")
    spec = SUBSETS[subset]
    root = Path(data_root).expanduser().absolute()
    prompts = Path(prompts_dir).expanduser() if prompts_dir is not None else root / "prompts"
    prompts_path = prompts / spec.prompts_file
    if not prompts_path.is_file():
        raise VislensError(
            f"{prompts_path}: AdaptVis question file not found (copy the AdaptVis prompts/ folder "
            "into --data-root or pass prompts_dir)"
        )
    annotation_path = root / spec.annotation_file
    annotations = _read_annotations(annotation_path)
    samples = load_adaptvis_questions(prompts_path)
    if len(samples) != len(annotations):
        raise VislensError(
            f"{prompts_path} has {len(samples)} questions but {annotation_path} has "
            f"{len(annotations)} records; they are paired by position, so the counts must match"
        )
    mismatches = [
        sample.id
        for index, (sample, record) in enumerate(zip(samples, annotations))
        if not _attach_image(sample, spec, record, root, f"{annotation_path}: entry {index}")
    ]
    if mismatches:
        warnings.warn(
            f"{annotation_path}: {len(mismatches)} of {len(samples)} image names disagree with the "
            f"gold relation in {prompts_path.name} (first: {mismatches[0]}); check the file order",
            stacklevel=2,
        )
    return samples
