"""``vislens organism train|eval``: the command line of the organism."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import VislensError
from .card import write_model_card
from .config import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_PATH, DEFAULT_STEPS, EVAL_SEED, TRAIN_FILE
from .evaluation import evaluate_organism
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
    e = sub.add_parser("eval", help="held-out accuracy/confidence per relation")
    e.add_argument("--path", default=str(DEFAULT_PATH))
    e.add_argument("--n-groups", type=int, default=100)
    e.add_argument("--seed", type=int, default=EVAL_SEED)
    e.add_argument("--write-card", action="store_true",
                   help="rewrite the model card from training.json and this evaluation")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run parsed :func:`add_arguments` arguments; returns the exit status."""
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        if args.organism_command == "train":
            stats = train_organism(args.out, seed=args.seed, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, minutes=args.minutes,
                                   small=args.small)
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
            df = evaluate_organism(args.path, n_groups=args.n_groups, seed=args.seed)
            print(df.to_string(index=False))
            print("image attention in the boxes per layer:", df.attrs["box_attention_by_layer"],
                  "ratio:", df.attrs["box_ratio_by_layer"])
            if args.write_card:
                stats = json.loads(Path(args.path, TRAIN_FILE).read_text(encoding="utf-8"))
                card = write_model_card(args.path, stats, df,
                                        {"n_groups": args.n_groups, "seed": args.seed})
                print(f"model card: {card}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``vislens organism train|eval ...`` as a function; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="vislens organism", description="Train or evaluate vislens's model organism."))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except VislensError as exc:
        print(f"vislens: error: {exc}", file=sys.stderr)
        return 2
