"""Cost of ``vislens sweep``'s validation stage against one greedy pass over the same samples.

The sweep's validation stage runs ``baseline`` + ``scaling:alpha=a`` for the union of the
grid's alphas in one engine run per batch (one shared prefill), then scores every AdaptVis
(alpha1, alpha2, beta) offline. Target (issue): 5 alphas + 2 x 3 AdaptVis pairs x 8 betas
costs <= 2.0x a greedy pass (engine with only ``baseline``). Both are timed alternately
(median of ``--repeats``) so background CPU load hits them alike. ``--threads`` defaults
to 1: on a small shared machine, multi-threaded tiny ops are dominated by scheduling noise
(the many small decode forwards suffer most), which makes the ratio unstable.

Usage: python benchmarks/bench_sweep.py [--groups 8] [--batch-size 8] [--repeats 3]
           [--max-new-tokens 8] [--threads 1] [--model DIR]
Model: ``data/organism`` if present, else a tiny random LLaVA
(``build_tiny("llava", dir, hidden=128, layers=4)``, 576 image tokens).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from _timing import paired

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_dir(arg: str | None, tmp: Path) -> tuple[str, str]:
    from vislens.models import organism_path
    from vislens.models.tiny import build_tiny
    from vislens.synth import object_names

    if arg:
        return arg, arg
    if (organism_path() / "config.json").exists():
        return str(organism_path()), "the organism (data/organism)"
    path = build_tiny("llava", tmp / "tiny", hidden=128, layers=4, words=object_names())
    return str(path), "tiny random LLaVA (hidden=128, layers=4, 576 image tokens)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=8, help="scene groups of 4 (samples = 4 x groups)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--model", help="model directory (default: organism, else tiny LLaVA)")
    args = ap.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from vislens.data import load_jsonl
    from vislens.models import load_model
    from vislens.sweep import choose, make_grid, validation_pass
    from vislens.synth import generate_groups, write_scenes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, what = model_dir(args.model, tmp)
        adapter = load_model(path, dtype="float32", device="cpu")
        samples = load_jsonl(write_scenes(generate_groups(args.groups, "a", seed=7), tmp / "scenes"))
        grid = make_grid("0.5,0.8,1.2,1.5,2.0", "0.5,0.8", "1.2,1.5,2.0", "0.20:0.55:0.05")
        kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

        def greedy():
            validation_pass(adapter, samples, [1.0], **kw)

        def sweep():
            choose(validation_pass(adapter, samples, grid.run_alphas, **kw), grid)

        tg, ts = paired(greedy, sweep, args.repeats)
    g, s = float(np.median(tg)), float(np.median(ts))
    settings = len(grid.pairs) * len(grid.betas)
    print(f"model: {what}; torch threads: {torch.get_num_threads()}")
    print(f"{len(samples)} samples, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
          f"{args.repeats} alternating repeats (median)")
    print(f"greedy pass (baseline only):                         {g:7.2f} s  "
          f"{' '.join(f'{t:.2f}' for t in tg)}")
    print(f"sweep ({len(grid.scaling_alphas) - 1} alphas + {settings} AdaptVis settings, "
          f"{len(grid.run_alphas)} steps): {s:7.2f} s  {' '.join(f'{t:.2f}' for t in ts)}")
    ratio = s / g
    print(f"ratio sweep / greedy: {ratio:.2f}x  (target <= 2.00x: {'OK' if ratio <= 2.0 else 'OVER'})")


if __name__ == "__main__":
    main()
