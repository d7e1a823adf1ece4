"""``vislens organism train|eval``: the command line of the organism."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import VislensError
from ..io import add_force_argument, check_output, unclaim_on_failure
from ..jobs import refuse_repeats
from .card import write_model_card
from .config import (DEFAULT_BATCH, DEFAULT_FAMILIAR_WEIGHT, DEFAULT_LR, DEFAULT_PATH, DEFAULT_STEPS, DEFAULT_STYLE,
                     EVAL_SEED, SCORECARD_GROUPS, SCORECARD_SEED, TRAIN_FILE)
from .config import relation_weights
from .evaluation import evaluate_organism, training_style
from .training import train_organism

__all__ = ["add_arguments", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` / ``eval`` subcommands to ``parser`` (``vislens organism``)."""
    sub = parser.add_subparsers(dest="organism_command", required=True, metavar="{train,eval}")
    t = sub.add_parser("train", help="train from scratch, evaluate, write the model card")
    t.add_argument("--out", required=True, help="output directory (e.g. data/organism)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    t.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    t.add_argument("--lr", type=float, default=DEFAULT_LR)
    t.add_argument("--minutes", type=float, default=None, help="stop training after this long")
    t.add_argument("--n-groups", type=int, default=100, help="held-out groups per subset")
    t.add_argument("--small", action="store_true", help="the tiny test variant")
    t.add_argument("--style", default=DEFAULT_STYLE,
                   help="training scenes: distractors=LO-HI,occlusion=P,texture=N,clutter=N,"
                        "lookalike=P")
    t.add_argument("--familiar-weight", type=float, default=DEFAULT_FAMILIAR_WEIGHT,
                   help="left/right scenes per scene of each rare relation (LLaVA-like skew)")
    add_force_argument(t)
    e = sub.add_parser("eval", help="held-out accuracy/confidence per relation")
    e.add_argument("--path", default=str(DEFAULT_PATH))
    e.add_argument("--n-groups", type=int, default=100)
    e.add_argument("--seed", type=int, default=EVAL_SEED)
    e.add_argument("--write-card", action="store_true",
                   help="rewrite the model card from training.json and this evaluation")
    e.add_argument("--scorecard", metavar="DIR", default=None,
                   help="also capture held-out scenes and write the findings scorecard to DIR")
    e.add_argument("--scorecard-groups", type=int, default=None,
                   help=f"groups of 4 scenes per subset for --scorecard/--diagnose "
                        f"(default {SCORECARD_GROUPS})")
    e.add_argument("--scorecard-seed", type=int, default=None,
                   help=f"scene seed of --scorecard/--diagnose (default {SCORECARD_SEED})")
    e.add_argument("--style", default=None,
                   help="scene style of --scorecard/--diagnose (default: the training scenes' "
                        "style)")
    e.add_argument("--diagnose", metavar="DIR", default=None,
                   help="also capture the scorecard's scenes under ScalingVis restricted to "
                        "each layer (and the wired heads) and write the gains per confidence "
                        "half to DIR (halves.md/.csv)")
    e.add_argument("--control", action="store_true",
                   help="with --scorecard: also score the untrained init (same architecture "
                        "and prior) on the same scenes")
    return parser


def _scorecard(args: argparse.Namespace) -> dict:
    """Run the held-out scorecard (and the untrained control) for ``eval --scorecard``."""
    from dataclasses import asdict

    from ..io import prepare_output_dir
    from .build import build_organism
    from .scorecard import SCORECARD_CONDITIONS, run_scorecard

    stats_file = Path(args.path, TRAIN_FILE)
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.exists() else {}
    style = args.style if args.style is not None else stats.get("style", "plain")
    out = prepare_output_dir(args.scorecard)

    def rows(found) -> list[dict]:
        return [{k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(f).items()}
                for f in found]

    kw = dict(n_groups=args.scorecard_groups, seed=args.scorecard_seed, style=style)
    result = {"n_groups": args.scorecard_groups, "seed": args.scorecard_seed, "style": style,
              "conditions": list(SCORECARD_CONDITIONS),
              "findings": rows(run_scorecard(args.path, out / "trained", **kw))}
    if args.control:
        seed = int(stats.get("seed", 0))
        build_organism(out / "control-model", seed=seed, small=bool(stats.get("small", False)))
        result["control"] = rows(run_scorecard(out / "control-model", out / "control", **kw))
        result["control_seed"] = seed
    return result


def _diagnosis(args: argparse.Namespace) -> dict:
    """Run ``eval --diagnose``: ScalingVis per layer on the scorecard's scenes, by half."""
    from .diagnosis import run_diagnosis

    style = args.style if args.style is not None else training_style(args.path)
    table = run_diagnosis(args.path, args.diagnose, n_groups=args.scorecard_groups,
                          seed=args.scorecard_seed, style=style)
    return {"n_groups": args.scorecard_groups, "seed": args.scorecard_seed, "style": style,
            "conditions": ["baseline", *table["condition"].unique()],
            "rows": json.loads(table.to_json(orient="records")),  # NaN -> null
            "headroom": table.attrs["headroom"]}


def run(args: argparse.Namespace) -> int:
    """Run parsed :func:`add_arguments` arguments; returns the exit status."""
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        if args.organism_command == "train":
            from ..io import prepare_output_dir

            if not (math.isfinite(args.lr) and args.lr > 0):
                raise VislensError(f"--lr {args.lr:g}: must be a positive number")
            if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
                raise VislensError(f"--minutes {args.minutes:g}: must be a positive number")
            if args.n_groups < 1:  # refused now, not after the training run
                raise VislensError(f"--n-groups {args.n_groups}: must be >= 1")
            prepare_output_dir(args.out, force=args.force)  # never over a folder it did not make
            stats = train_organism(args.out, seed=args.seed, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, minutes=args.minutes,
                                   small=args.small, style=args.style,
                                   relation_weights=relation_weights(args.familiar_weight))
            t = time.perf_counter()
            df = evaluate_organism(args.out, n_groups=args.n_groups, seed=EVAL_SEED)
            print(df.to_string(index=False))
            print("image attention in the boxes per layer:", df.attrs["box_attention_by_layer"],
                  "ratio:", df.attrs["box_ratio_by_layer"])
            print(f"evaluated in {time.perf_counter() - t:.0f}s")
            card = write_model_card(args.out, stats, df, {"n_groups": args.n_groups, "seed": EVAL_SEED})
            print(f"model card: {card}")
        else:
            if not Path(args.path, "config.json").exists():
                raise VislensError(f"{args.path}: no model organism there (no config.json)")
            if args.control and not args.scorecard:
                raise VislensError("--control needs --scorecard DIR")
            unused = [flag for flag, v in (("--style", args.style),
                                           ("--scorecard-groups", args.scorecard_groups),
                                           ("--scorecard-seed", args.scorecard_seed))
                      if v is not None]
            if unused and not (args.scorecard or args.diagnose):
                raise VislensError(f"{unused[0]} needs --scorecard DIR or --diagnose DIR (it sets "
                                   "their scenes)")
            if args.scorecard_groups is None:
                args.scorecard_groups = SCORECARD_GROUPS
            elif args.scorecard_groups < 1:
                raise VislensError(f"--scorecard-groups {args.scorecard_groups}: must be >= 1")
            if args.scorecard_seed is None:
                args.scorecard_seed = SCORECARD_SEED
            if args.write_card and not Path(args.path, TRAIN_FILE).is_file():
                raise VislensError(f"{Path(args.path, TRAIN_FILE)}: not found; --write-card needs "
                                   "the training statistics that vislens organism train writes")
            if args.diagnose and args.scorecard and \
                    Path(args.diagnose).resolve() == Path(args.scorecard).resolve():
                raise VislensError(f"--diagnose and --scorecard name the same folder "
                                   f"{args.diagnose}: give each its own")
            for folder in (args.scorecard, args.diagnose):  # refused before any work
                if folder:
                    check_output(folder, kind="folder")
            df = evaluate_organism(args.path, n_groups=args.n_groups, seed=args.seed)
            print(df.to_string(index=False))
            print("image attention in the boxes per layer:", df.attrs["box_attention_by_layer"],
                  "ratio:", df.attrs["box_ratio_by_layer"])
            scorecard = _scorecard(args) if args.scorecard else None
            diagnosis = _diagnosis(args) if args.diagnose else None
            if args.write_card:
                stats = json.loads(Path(args.path, TRAIN_FILE).read_text(encoding="utf-8"))
                meta_file = Path(args.path, "organism.json")
                meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
                old = meta.get("scorecard")
                if diagnosis is None:  # keep the card's diagnosis when not re-measured
                    diagnosis = meta.get("diagnosis")
                if scorecard is None:  # keep the card's scorecard when not re-measured
                    scorecard = old
                elif old and old.get("notes") and all(
                        old.get(k) == scorecard[k] for k in ("n_groups", "seed", "style", "conditions")):
                    scorecard["notes"] = old["notes"]  # the card's notes on the same measurement
                card = write_model_card(args.path, stats, df,
                                        {"n_groups": args.n_groups, "seed": args.seed}, scorecard,
                                        diagnosis)
                print(f"model card: {card}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``vislens organism train|eval ...`` as a function; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="vislens organism", description="Train or evaluate vislens's model organism."))
    args = refuse_repeats(parser).parse_args(list(sys.argv[1:] if argv is None else argv))
    vars(args).pop("_given", None)
    try:
        with unclaim_on_failure():
            return run(args)
    except VislensError as exc:
        print(f"vislens: error: {exc}", file=sys.stderr)
        return 2
