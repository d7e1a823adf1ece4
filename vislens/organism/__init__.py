"""The model organism: a tiny LLaVA-1.5 trained by vislens on synthetic two-object scenes.

Real VLM weights are large downloads; the organism lets everything in vislens (capture,
steering, AdaptVis, the notebooks, ``make demo``, the integration tests) run end to end on a
laptop CPU with *meaningful* attention. It has LLaVA-1.5's architecture, only small:

* a CLIP vision tower over 48x48 images with 2-pixel patches, so the answer position sees a
  24x24 grid of 576 image tokens exactly like LLaVA-1.5 (features from the penultimate
  layer, CLS dropped);
* LLaVA's two-layer GELU projector;
* a small Llama language model with a word-level tokenizer and the LLaVA-1.5 chat template
  (``USER: <image>\\n{question} ASSISTANT:``).

It is trained (answer tokens only, teacher forcing) on :mod:`vislens.synth` scenes of both
What'sUp-style subsets with a familiarity bias: left/right are more frequent than
on/under and front/behind (``--familiar-weight``; 1.5:1 for the committed checkpoint, whose
scenes also hold look-alikes of the named objects), so, like LLaVA in the paper, it is
confident on the familiar relations and less so on the rare ones. Training starts from a seeded init that wires a
rough "find the two named objects" circuit (:func:`.build._wire_init`; a stand-in for the aligned,
pretrained parts a real LLaVA starts from), so the answer position's image attention is on
the objects and a CPU budget of minutes suffices. The committed weights live in
``data/organism`` (:data:`DEFAULT_PATH`) with a model card; ``vislens organism train``
reproduces them.

One module per stage: :mod:`.config` (architecture, data bias, defaults), :mod:`.build`
(model and wired init), :mod:`.training`, :mod:`.evaluation`, :mod:`.scorecard` (the
findings scorecard on held-out scenes, and on the untrained init as a control),
:mod:`.diagnosis` (ScalingVis restricted to single layers, by confidence half), :mod:`.card`
(the model card, templated from ``model_card.md``) and :mod:`.cli` (``vislens organism
train|eval``).
"""
from __future__ import annotations

from .build import build_organism, count_parameters
from .card import write_model_card
from .cli import add_arguments, main, run
from .config import DEFAULT_PATH, EVAL_SEED, ORGANISM, RELATION_WEIGHTS, SMALL
from .diagnosis import diagnosis_conditions, run_diagnosis
from .evaluation import evaluate_organism
from .scorecard import SCORECARD_CONDITIONS, run_scorecard
from .training import train_organism

__all__ = ["DEFAULT_PATH", "EVAL_SEED", "RELATION_WEIGHTS", "ORGANISM", "SMALL", "build_organism",
           "count_parameters", "train_organism", "evaluate_organism", "write_model_card",
           "SCORECARD_CONDITIONS", "run_scorecard", "diagnosis_conditions", "run_diagnosis",
           "add_arguments", "run", "main"]
