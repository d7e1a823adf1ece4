"""Job parameters shared by ``vislens capture`` and ``vislens sweep``: their checks and
their command-line flags, each declared once.

Torch-free, so the CLI builds its parser (and refuses a bad flag) without loading torch.
"""
from __future__ import annotations

import argparse
import os

from .errors import VislensError

__all__ = ["MATCHERS", "MAX_GRID", "check_job", "check_memory", "attention_bytes",
           "add_job_arguments", "refuse_repeats", "Terminated", "request_stop", "clear_stop",
           "check_stop"]

MATCHERS = ("paper", "first-word")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: writers close, locks are released, work is resumable."""


_stop_requested = False


def request_stop() -> None:
    """Ask running jobs to stop at their next batch (the CLI's SIGTERM handler calls this).

    The handler also raises :class:`Terminated` at once; the flag makes the stop stick even
    when that exception lands where Python swallows it (a finalizer, a GC callback)."""
    global _stop_requested
    _stop_requested = True


def clear_stop() -> None:
    global _stop_requested
    _stop_requested = False


def check_stop() -> None:
    """Raise :class:`Terminated` if a stop was requested (called between batches)."""
    if _stop_requested:
        raise Terminated()
#: largest analysis grid side (--grid); far above every supported model's patch grid
MAX_GRID = 256


def check_job(*, batch_size: int, max_new_tokens: int, grid: int, matcher: str,
              on_error: str = "stop", prompt_style: str = "chat") -> None:
    """Every scalar job parameter, checked before any file or model is touched."""
    if on_error not in ("stop", "skip"):
        raise VislensError(f"--on-error {on_error!r}: choose stop or skip")
    if matcher not in MATCHERS:
        raise VislensError(f"--matcher {matcher!r}: choose one of {', '.join(MATCHERS)}")
    if batch_size < 1:
        raise VislensError(f"--batch-size {batch_size}: must be >= 1")
    if max_new_tokens < 1:
        raise VislensError(f"--max-new-tokens {max_new_tokens}: must be >= 1 (the answer needs "
                           "at least one token)")
    if not 1 <= grid <= MAX_GRID:
        raise VislensError(f"--grid {grid}: must be in 1..{MAX_GRID} (cells per side of the "
                           "analysis grid; the models' patch grids are 24-64)")
    if prompt_style not in ("chat", "paper"):
        raise VislensError(f"--prompt-style {prompt_style!r}: choose chat or paper")


def check_memory(*, batch_size: int, n_conditions: int, num_layers: int, num_heads: int,
                 grid: int) -> None:
    """Refuse a batch whose attention maps alone would not fit in the memory available now."""
    need = attention_bytes(batch_size, n_conditions, num_layers, num_heads, grid)
    free = _available_memory()
    if free is not None and need > free:
        from .io import human_bytes

        raise VislensError(f"--grid {grid} with --batch-size {batch_size} and {n_conditions} "
                           f"condition(s) needs about {human_bytes(need)} for the attention maps "
                           f"of one batch ({num_layers} layers x {num_heads} heads x {grid}x{grid}"
                           f"), but only {human_bytes(free)} of memory are available; lower "
                           "--batch-size or --grid")


def attention_bytes(batch_size: int, n_conditions: int, num_layers: int, num_heads: int,
                    grid: int) -> int:
    """Host memory of one batch's pooled attention maps: float32 while pooled and checked,
    float16 results per condition, and the same again while written (a safe upper bound)."""
    per_map = num_layers * num_heads * grid * grid
    return batch_size * per_map * (4 + 2 * n_conditions) * 2


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def add_job_arguments(p: argparse.ArgumentParser, *, max_new_tokens: int,
                      splits: str = "the split") -> argparse.ArgumentParser:
    """The flags every job that runs a model over a dataset takes (capture, sweep)."""
    p.add_argument("--model", required=True, help="hub id, local checkpoint directory, or 'organism'")
    p.add_argument("--dataset", required=True,
                   help="whatsup:controlled_a|controlled_b|coco_one|coco_two|vg_one|vg_two, "
                        "vsr:test|dev|train, or jsonl:PATH")
    p.add_argument("--data-root", help="folder with the downloaded benchmark files")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 20%% validation split")
    p.add_argument("--limit", type=int, help=f"only the first N samples of {splits}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--matcher", default="paper", choices=list(MATCHERS))
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N, or balanced (several GPUs)")
    p.add_argument("--grid", type=int, default=24,
                   help=f"analysis grid size G (G x G cells, 1..{MAX_GRID})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--ray", metavar="local|auto|HOST:PORT",
                   help="run the batches on a Ray cluster: local starts one on this machine, "
                        "auto or HOST:PORT joins a running one (docs/scale.md)")
    p.add_argument("--workers", type=int, help="Ray workers, one model replica each (default 1)")
    p.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per Ray worker (default: 1 if the cluster has GPUs, else 0)")
    return p


class _StoreOnce(argparse._StoreAction):
    """A value option given twice with different values is refused (argparse keeps the last
    one silently: ``--out a --out b`` would ignore ``a``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", {})
        if self.dest in given and given[self.dest] != values:
            raise argparse.ArgumentError(self, f"given twice ({given[self.dest]!r}, then "
                                         f"{values!r}); give it once")
        given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)


def refuse_repeats(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make every value option of ``parser`` and its subcommands refuse a second, different
    value (:class:`_StoreOnce`) and refuse abbreviated option names (argparse would take
    ``--split 3`` for ``--split-seed 3``); returns ``parser``."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if type(action) is argparse._StoreAction:
            action.__class__ = _StoreOnce
        elif isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                refuse_repeats(sub)
    return parser
