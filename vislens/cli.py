"""The ``vislens`` command line: one subcommand per stage of the data flow.

Every bad input ends in one line, ``vislens: error: ...``, and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from . import __version__
from .conditions import condition_help
from .errors import VislensError
from .io import add_force_argument, unclaim_on_failure
from .jobs import Terminated, add_job_arguments, clear_stop, refuse_repeats, request_stop


def _cmd_capture(args: argparse.Namespace) -> int:
    from .capture import run_capture
    from .evaluate import evaluate_capture, to_markdown

    summary = run_capture(
        model=args.model, dataset=args.dataset, data_root=args.data_root, out=args.out,
        conditions=args.condition or ["baseline"], split=args.split, limit=args.limit,
        batch_size=args.batch_size, shard=args.shard, dtype=args.dtype, device=args.device,
        on_error=args.on_error, max_new_tokens=args.max_new_tokens, grid=args.grid,
        matcher=args.matcher, split_seed=args.split_seed, prompt_style=args.prompt_style,
        progress=not args.quiet, ray=args.ray, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
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
    from .io import prepare_output_dir

    out = args.out or str(Path(args.file).with_suffix("")) + "-eval"
    prepare_output_dir(out, force=args.force)
    tables = evaluate_capture(args.file, out)
    for name, df in tables.items():
        print(f"## {name}\n")
        fmt = {"vsr": ".3f", "inference_time": ".3g"}.get(name, ".1f")  # Table 9: seconds
        print(to_markdown(df, floatfmt=fmt))
        print()
    print(f"CSV written to {out}/")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .store import merge

    path = merge(args.out, args.shards, force=args.force)
    print(f"merged {len(args.shards)} shard(s) into {path}")
    return 0


def _cmd_boxes(args: argparse.Namespace) -> int:
    from .boxes import attach_boxes

    yolo_only = {"--weights": args.weights, "--conf": args.conf,
                 "--batch-size": args.batch_size, "--device": args.device,
                 "--on-error": args.on_error}
    if args.detector != "yolo":
        given = [flag for flag, v in yolo_only.items() if v is not None]
        if given:
            raise VislensError(f"{given[0]} applies to --detector yolo only (annotation boxes "
                               "are read from the dataset, no detector runs)")
    r = attach_boxes(args.file, args.detector, weights=args.weights,
                     conf=0.25 if args.conf is None else args.conf,
                     batch=16 if args.batch_size is None else args.batch_size,
                     device=args.device,
                     on_error="skip" if args.on_error is None else args.on_error)
    print(f"{args.file}: {r['boxes']} box(es) for {r['samples']} samples ({r['with_mask']} with a "
          f"mask); {r['unmatched']} question object(s) without a box")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .io import prepare_output_dir
    from .report import write_report

    out = args.out or str(Path(args.file).with_suffix("")) + "-report"
    prepare_output_dir(out, force=args.force)
    conds = [c.strip() for c in args.conditions.split(",")] if args.conditions else None
    if conds and len(set(conds)) < len(conds):
        dup = next(c for c in conds if conds.count(c) > 1)
        raise VislensError(f"--conditions {args.conditions}: {dup!r} is listed twice")
    path = write_report(args.file, out, conditions=conds, chunk=args.chunk)
    print(f"wrote {path} (and CSV/PNG files beside it)")
    return 0


def _cmd_findings(args: argparse.Namespace) -> int:
    from .findings import scorecard_text, write_findings
    from .io import prepare_output_dir

    prepare_output_dir(args.out, force=args.force)
    found, path = write_findings(args.files, args.out, n_boot=args.n_boot, seed=args.seed,
                                 chunk=args.chunk)
    print(scorecard_text(found))
    print(f"wrote {path} (and findings.csv, findings.json)")
    return 0


def _cmd_phrase_stats(args: argparse.Namespace) -> int:
    from .evaluate import to_markdown
    from .phrases import phrase_stats, read_conversations

    from .io import check_output, os_reason

    if args.force and not args.out:
        raise VislensError("--force needs --out FILE (without --out nothing is written)")
    if args.out:
        check_output(args.out, force=args.force)
        if Path(args.out).is_dir():
            raise VislensError(f"{args.out} is a folder; --out names the CSV file to write")
    speakers = None if args.speaker == "all" else [args.speaker]
    texts = read_conversations(args.file, speakers)
    df = phrase_stats(texts)
    print(f"{len(texts)} conversation record(s) in {args.file}\n")
    print(to_markdown(df))
    if args.out:
        try:
            df.to_csv(args.out)
        except OSError as exc:
            raise VislensError(f"{args.out}: cannot write ({os_reason(exc)})") from None
        print(f"wrote {args.out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .io import prepare_output_dir
    from .synth import SceneStyle, synthesize

    prepare_output_dir(args.out, force=args.force)
    subsets = tuple(s.strip() for s in args.subsets.split(",") if s.strip())
    out = synthesize(args.out, args.n, args.seed, subsets=subsets, size=args.size,
                     style=SceneStyle.parse(args.style))
    for s in subsets:
        print(f"wrote {Path(out) / f'controlled_{s}.jsonl'}  (use --dataset jsonl:{Path(out) / f'controlled_{s}.jsonl'})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .io import prepare_output_dir

    prepare_output_dir(args.out, force=args.force)
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
    add_job_arguments(c, max_new_tokens=16)
    c.add_argument("--out", required=True,
                   help="output .h5 file (resumed if it exists; with --shard I/N the job writes "
                        "OUT-stem.shardI-of-N.h5 instead, e.g. run.h5 -> run.shard0-of-4.h5)")
    c.add_argument("--condition", action="append", metavar="SPEC",
                   help=condition_help().replace("%", "%%"))
    c.add_argument("--split", default="all", choices=["val", "test", "all"])
    c.add_argument("--shard", help="I/N (0 <= I < N): this job takes every N-th sample from I and "
                   "writes OUT as OUT-stem.shardI-of-N.h5; combine the N files with vislens merge")
    c.add_argument("--on-error", default="stop", choices=["stop", "skip"])
    c.add_argument("--prompt-style", default="chat", choices=["chat", "paper"],
                   help="chat: the model's chat template around the plain question; paper: the "
                        "published AdaptVis prompt strings verbatim (written for LLaVA-1.5; refused for "
                        "models whose image placeholder is not <image>, e.g. Qwen2-VL)")
    c.set_defaults(func=_cmd_capture)

    e = sub.add_parser("evaluate", help="accuracy tables of a capture file")
    e.add_argument("file")
    e.add_argument("--out", help="folder for the CSV files (default: FILE-eval/)")
    add_force_argument(e)
    e.set_defaults(func=_cmd_evaluate)

    m = sub.add_parser("merge", help="combine shard files into one capture",
                       description="Combine the files of capture --shard I/N jobs "
                       "(run.shard0-of-N.h5 ... run.shardN-1-of-N.h5) into one final capture, "
                       "rows in dataset order. Predictions equal a one-process run's; attention "
                       "and probabilities agree to about one float16 step (batches differ).")
    m.add_argument("out", help="the merged capture file (must not exist, unless --force)")
    m.add_argument("shards", nargs="+", help="the shard files, e.g. run.shard*-of-4.h5")
    add_force_argument(m, "replace an existing OUT")
    m.set_defaults(func=_cmd_merge)

    b = sub.add_parser("boxes", help="object boxes (YOLO or dataset annotations) -> patch masks in a capture")
    b.add_argument("file")
    b.add_argument("--detector", default="annotations", choices=["annotations", "yolo"])
    b.add_argument("--weights", help="YOLO weights file (ultralytics), e.g. yolov8x.pt")
    b.add_argument("--conf", type=float, default=None,
                   help="detection confidence threshold (yolo; default 0.25)")
    b.add_argument("--batch-size", type=int, default=None, help="images per batch (yolo; default 16)")
    b.add_argument("--device", default=None, help="detector device (yolo)")
    b.add_argument("--on-error", default=None, choices=["stop", "skip"],
                   help="unreadable images (yolo): record as unmatched (skip, the default) or stop")
    b.set_defaults(func=_cmd_boxes)

    r = sub.add_parser("report", help="per-layer AUROC report: CSV, plots and report.md")
    r.add_argument("file")
    r.add_argument("--out", help="output folder (default: FILE-report/)")
    r.add_argument("--conditions", help="comma-separated subset of the capture's conditions")
    r.add_argument("--chunk", type=int, default=32, help="samples read per chunk (memory)")
    add_force_argument(r)
    r.set_defaults(func=_cmd_report)

    fi = sub.add_parser("findings", help="test the paper's claims F1-F10 on capture files "
                        "(findings.md/.csv/.json)")
    fi.add_argument("files", nargs="+", metavar="CAPTURE.h5", help="one or more capture files (pooled)")
    fi.add_argument("--out", required=True, help="output folder")
    fi.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    fi.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fi.add_argument("--chunk", type=int, default=32, help="samples read per chunk (memory)")
    add_force_argument(fi)
    fi.set_defaults(func=_cmd_findings)

    ph = sub.add_parser("phrase-stats", help="relation-phrase counts in a LLaVA-format "
                        "training-conversation file (Figure 15)")
    ph.add_argument("file", metavar="CONVERSATIONS.json")
    ph.add_argument("--speaker", default="all", choices=["all", "human", "gpt"],
                    help="count the turns of this speaker only (default: all)")
    ph.add_argument("--out", help="also write the table as CSV")
    add_force_argument(ph, "replace an existing --out file")
    ph.set_defaults(func=_cmd_phrase_stats)

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
                   help="busy scenes: distractors=LO-HI,occlusion=P,texture=N,clutter=N,lookalike=P "
                        "(extra objects, partial occlusion, background noise, specks)")
    add_force_argument(s)
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
    add_force_argument(d)
    d.set_defaults(func=_cmd_demo)
    return refuse_repeats(p)


def _glue_values(argv: Sequence[str]) -> list[str]:
    """``--shard -1/2`` -> ``--shard=-1/2``: argparse would take a value starting with ``-``
    for an option and answer with its multi-line usage; vislens checks it in one line."""
    if not argv or argv[0] != "capture":
        return list(argv)
    out: list[str] = []
    it = iter(argv)
    for tok in it:
        if tok == "--shard":
            nxt = next(it, None)
            out.append(tok if nxt is None else f"{tok}={nxt}")
        else:
            out.append(tok)
    return out


def _on_sigterm(signum: int, frame: object) -> None:
    request_stop()
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_glue_values(argv))
    vars(args).pop("_given", None)
    clear_stop()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with unclaim_on_failure():  # a failed command leaves no empty output folder behind
            return args.func(args)
    except VislensError as exc:
        print(f"vislens: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("vislens: terminated (SIGTERM); run the same command again to resume",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
