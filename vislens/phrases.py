"""``vislens phrase-stats CONVERSATIONS.json``: relation phrases in LLaVA-format training data.

The paper's Figure 15 (middle) counts how often each spatial relation is phrased in
LLaVA's training conversations, to show that left/right are familiar and on/under/front/
behind rare. The rules (case-insensitive, whole words; ``<image>`` tokens removed):

- **left** / **right**: "left side", "left of", "to the left", "on the left" (and the same
  with right). Each occurrence of the word counts once, so "on the left side of" is one.
- **on**: the word "on", except in "on the left" / "on the right" (those are left/right);
  plus "above" and "top" (the paper's "On etc" = on/above/top), where "on top of" counts
  once.
- **under**: "under", "below", "beneath", "bottom" (the paper's "Under etc").
- **front**: "in front of".  **behind**: "behind".

A LLaVA-format file is a JSON list of records, each with ``conversations``: a list of turns
``{"from": "human"|"gpt", "value": TEXT}``. Counts are occurrences and the number of
records with at least one occurrence.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from .errors import VislensError

__all__ = ["RELATION_PHRASES", "count_phrases", "phrase_stats", "read_conversations"]

_W = r"(?<![\w-])"  # word start
_E = r"(?![\w-])"  # word end


def _side(word: str) -> list[str]:
    # the capture group is the relation word itself: overlapping phrases count it once
    return [rf"{_W}({word}){_E}\s+side{_E}", rf"{_W}({word}){_E}\s+of{_E}",
            rf"{_W}to\s+the\s+({word}){_E}", rf"{_W}on\s+the\s+({word}){_E}"]


#: relation -> regular expressions; each match's group 1 is the counted word
RELATION_PHRASES: dict[str, list[str]] = {
    "left": _side("left"),
    "right": _side("right"),
    "on": [rf"{_W}(on){_E}(?!\s+the\s+(?:left|right){_E})", rf"{_W}(above){_E}",
           rf"(?<!\bon\s){_W}(top){_E}"],
    "under": [rf"{_W}(under|below|beneath|bottom){_E}"],
    "front": [rf"{_W}in\s+(front)\s+of{_E}"],
    "behind": [rf"{_W}(behind){_E}"],
}
_COMPILED = {rel: [re.compile(p, re.IGNORECASE) for p in pats] for rel, pats in RELATION_PHRASES.items()}
_IMAGE = re.compile(r"<image>", re.IGNORECASE)


def count_phrases(text: str) -> dict[str, int]:
    """Occurrences of each relation in ``text`` under the rules above (one per word)."""
    text = _IMAGE.sub(" ", text)
    out = {}
    for rel, pats in _COMPILED.items():
        starts = {m.start(1) for p in pats for m in p.finditer(text)}
        out[rel] = len(starts)
    return out


def read_conversations(path: str | Path, speakers: Sequence[str] | None = None) -> list[str]:
    """One text per record: its turns' values joined (only ``speakers``' turns if given)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VislensError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise VislensError(f"{p}: is a folder, not a conversation JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VislensError(f"{p}: not a JSON file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise VislensError(f"{p}: expected a JSON list of records with 'conversations' "
                           f"(LLaVA format), got a {type(data).__name__}")
    texts = []
    for i, rec in enumerate(data):
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list):
            raise VislensError(f"{p}: record {i} has no 'conversations' list")
        parts = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise VislensError(f"{p}: record {i} turn {k} has no text 'value'")
            if speakers is None or turn.get("from") in speakers:
                parts.append(turn["value"])
        texts.append("\n".join(parts))
    return texts


def phrase_stats(texts: Iterable[str]) -> pd.DataFrame:
    """Per relation: ``occurrences``, ``records`` (with at least one) and ``percent`` of all
    occurrences; rows in the order left, right, on, under, front, behind."""
    occ = {rel: 0 for rel in RELATION_PHRASES}
    rec = {rel: 0 for rel in RELATION_PHRASES}
    for text in texts:
        for rel, k in count_phrases(text).items():
            occ[rel] += k
            rec[rel] += k > 0
    df = pd.DataFrame({"relation": list(occ), "occurrences": list(occ.values()),
                       "records": list(rec.values())})
    total = df["occurrences"].sum()
    df["percent"] = 100.0 * df["occurrences"] / total if total else float("nan")
    return df.set_index("relation")
