"""The ``vislens`` command line: one subcommand per stage of the data flow.

Every bad input ends in one line, ``vislens: error: ...``, and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import VislensError


def _cmd_capture(args: argparse.Namespace) -> int:
    from .capture import run_capture
    from .evaluate import evaluate_capture, to_markdown

    summary = run_capture(
        model=args.model, dataset=args.dataset, data_root=args.data_root, out=args.out,
        conditions=args.condition or ["baseline"], split=args.split, limit=args.limit,
        batch_size=args.batch_size, shard=args.shard, dtype=args.dtype, device=args.device,
        on_error=args.on_error, max_new_tokens=args.max_new_tokens, grid=args.grid,
        matcher=args.matcher, split_seed=args.split_seed, prompt_style=args.prompt_style,
        progress=not args.quiet,
        command="vislens " + shlex.join(sys.argv[1:]))
    state = "complete" if summary.complete else "incomplete"
    print(f"wrote {summary.path} ({state}: {summary.n_written} sample(s) this run, "
          f"{summary.n_failed} failed, {summary.seconds:.1f} s)")
    if summary.complete:
        acc = evaluate_capture(summary.path)["accuracy"]
        print(to_markdown(acc[acc["matcher"] == args.matcher].drop(columns="matcher")))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_capture, to_markdown

    out = args.out or str(Path(args.file).with_suffix("")) + "-eval"
    tables = evaluate_capture(args.file, out)
    for name, df in tables.items():
        print(f"## {name}\n")
        print(to_markdown(df, floatfmt=".3f" if name == "vsr" else ".1f"))
        print()
    print(f"CSV written to {out}/")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .store import merge

    path = merge(args.out, args.shards)
    print(f"merged {len(args.shards)} shard(s) into {path}")
    return 0


def _cmd_boxes(args: argparse.Namespace) -> int:
    from .boxes import attach_boxes

    r = attach_boxes(args.file, args.detector, weights=args.weights, conf=args.conf,
                     batch=args.batch_size, device=args.device, on_error=args.on_error)
    print(f"{args.file}: {r['boxes']} box(es) for {r['samples']} samples ({r['with_mask']} with a "
          f"mask); {r['unmatched']} question object(s) without a box")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = args.out or str(Path(args.file).with_suffix("")) + "-report"
    conds = [c.strip() for c in args.conditions.split(",")] if args.conditions else None
    path = write_report(args.file, out, conditions=conds, chunk=args.chunk)
    print(f"wrote {path} (and CSV/PNG files beside it)")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import SceneStyle, synthesize

    subsets = tuple(s.strip() for s in args.subsets.split(",") if s.strip())
    out = synthesize(args.out, args.n, args.seed, subsets=subsets, size=args.size,
                     style=SceneStyle.parse(args.style))
    for s in subsets:
        print(f"wrote {Path(out) / f'controlled_{s}.jsonl'}  (use --dataset jsonl:{Path(out) / f'controlled_{s}.jsonl'})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, groups=args.groups, model=args.model, batch_size=args.batch_size)
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .viewer import serve

    serve(args.file, host=args.host, port=args.port, open_browser=args.open, verbose=args.verbose)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vislens", description="Capture, steer and analyse the "
                                "answer position's attention of vision-language models.")
    p.add_argument("--version", action="version", version=f"vislens {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("capture", help="run decoding conditions over a dataset into an HDF5 capture")
    c.add_argument("--model", required=True, help="hub id, local checkpoint directory, or 'organism'")
    c.add_argument("--dataset", required=True,
                   help="whatsup:controlled_a|controlled_b|coco_one|coco_two|vg_one|vg_two, "
                        "vsr:test|dev|train, or jsonl:PATH")
    c.add_argument("--data-root", help="folder with the downloaded benchmark files")
    c.add_argument("--out", required=True, help="output .h5 file (resumed if it exists)")
    c.add_argument("--condition", action="append", metavar="SPEC",
                   help="baseline | scaling:alpha=A | adaptvis:alpha1=A1,alpha2=A2,beta=B | "
                        "add:delta=D (optional ,layers=8-15,heads=0+3,name=N); repeatable")
    c.add_argument("--split", default="all", choices=["val", "test", "all"])
    c.add_argument("--split-seed", type=int, default=0, help="seed of the 20%% validation split")
    c.add_argument("--limit", type=int, help="only the first N samples of the split")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--shard", help="I/N: this job takes every N-th sample from I; one file per shard")
    c.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, or balanced (several GPUs)")
    c.add_argument("--on-error", default="stop", choices=["stop", "skip"])
    c.add_argument("--max-new-tokens", type=int, default=16)
    c.add_argument("--grid", type=int, default=24, help="analysis grid size G (G x G cells)")
    c.add_argument("--matcher", default="paper", choices=["paper", "first-word"])
    c.add_argument("--prompt-style", default="chat", choices=["chat", "paper"],
                   help="chat: the model's chat template around the plain question; paper: the "
                        "published AdaptVis prompt strings verbatim (LLaVA-1.5 only)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_capture)

    e = sub.add_parser("evaluate", help="accuracy tables of a capture file")
    e.add_argument("file")
    e.add_argument("--out", help="folder for the CSV files (default: FILE-eval/)")
    e.set_defaults(func=_cmd_evaluate)

    m = sub.add_parser("merge", help="combine shard files into one capture")
    m.add_argument("out")
    m.add_argument("shards", nargs="+")
    m.set_defaults(func=_cmd_merge)

    b = sub.add_parser("boxes", help="object boxes (YOLO or dataset annotations) -> patch masks in a capture")
    b.add_argument("file")
    b.add_argument("--detector", default="annotations", choices=["annotations", "yolo"])
    b.add_argument("--weights", help="YOLO weights file (ultralytics), e.g. yolov8x.pt")
    b.add_argument("--conf", type=float, default=0.25, help="detection confidence threshold")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--device", default=None)
    b.add_argument("--on-error", default="skip", choices=["stop", "skip"],
                   help="unreadable images: record as unmatched (skip) or stop")
    b.set_defaults(func=_cmd_boxes)

    r = sub.add_parser("report", help="per-layer AUROC report: CSV, plots and report.md")
    r.add_argument("file")
    r.add_argument("--out", help="output folder (default: FILE-report/)")
    r.add_argument("--conditions", help="comma-separated subset of the capture's conditions")
    r.add_argument("--chunk", type=int, default=32, help="samples read per chunk (memory)")
    r.set_defaults(func=_cmd_report)

    from . import figures as _figures
    from . import sweep as _sweep

    sw = sub.add_parser("sweep", help="choose ScalingVis/AdaptVis on the validation split, "
                        "Table 1 on the test split")
    _sweep.add_arguments(sw)

    fg = sub.add_parser("figures", help="the paper's figures (3-10, 14, 15, 26) from a capture file")
    _figures.add_arguments(fg)
    fg.set_defaults(func=_figures.run)

    s = sub.add_parser("synth", help="render synthetic two-object scenes (JSONL + PNG)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=64, help="scenes per subset (whole groups of 4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--subsets", default="a,b", help="a (left/right/on/under), b (left/right/front/behind)")
    s.add_argument("--size", type=int, default=48, help="image side in pixels")
    s.add_argument("--style", default="plain",
                   help="busy scenes: distractors=LO-HI,occlusion=P,texture=N,clutter=N "
                        "(extra objects, partial occlusion, background noise, specks)")
    s.set_defaults(func=_cmd_synth)

    from . import organism as _organism

    o = sub.add_parser("organism", help="train or evaluate the embedded model organism",
                       description="Train or evaluate vislens's model organism.")
    _organism.add_arguments(o)
    o.set_defaults(func=_organism.run)

    v = sub.add_parser("view", help="interactive attention explorer of a capture file, in the browser")
    v.add_argument("file", help="capture file (.h5), complete or still being written")
    v.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--open", action="store_true", help="also open the page in the default browser")
    v.add_argument("--verbose", action="store_true", help="log every request to stderr")
    v.set_defaults(func=_cmd_view)

    d = sub.add_parser("demo", help="the whole pipeline on the model organism, in minutes on a CPU")
    d.add_argument("--out", default="vislens-demo", help="output folder (default: vislens-demo/)")
    d.add_argument("--groups", type=int, default=12, help="held-out scene groups per subset")
    d.add_argument("--model", default="organism")
    d.add_argument("--batch-size", type=int, default=8)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VislensError as exc:
        print(f"vislens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
