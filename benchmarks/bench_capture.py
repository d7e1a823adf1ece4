"""Capture-writer overhead and capture-file size (targets from the capture issue).

1. A real ``run_capture`` on a tiny LLaVA over synthetic scenes: time spent inside the
   HDF5 writer (write_batch + finalize) as a share of the whole capture (target <= 5%).
2. Bytes per sample and condition for L=32, H=32, G=24 (a 7B LLaVA) in the working file,
   i.e. before compression (target <= 1.2 MB), and the write time per sample against the
   tiny model's forward time per sample.

Usage: python benchmarks/bench_capture.py [--groups 8] [--hidden 128] [--layers 4]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


class Timed:
    """Accumulates wall time of wrapped methods."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def inner(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t
        return inner


def real_capture(tmp: Path, groups: int, hidden: int, layers: int) -> dict:
    from vislens import store
    from vislens.capture import run_capture
    from vislens.models.tiny import build_tiny
    from vislens.synth import generate_groups, object_names, write_scenes

    model = build_tiny("llava", tmp / "model", words=object_names(), hidden=hidden, layers=layers,
                       heads=8, kv_heads=4)
    data = write_scenes(generate_groups(groups, "a", seed=0), tmp / "scenes", name="a.jsonl")
    timer = Timed()
    orig_write, orig_final = store.CaptureWriter.write_batch, store.CaptureWriter.finalize
    store.CaptureWriter.write_batch = timer.wrap(orig_write)
    store.CaptureWriter.finalize = timer.wrap(orig_final)
    try:
        t0 = time.perf_counter()
        summary = run_capture(model=str(model), dataset=f"jsonl:{data}", out=tmp / "c.h5",
                              conditions=["baseline", "scaling:alpha=0.5", "scaling:alpha=2",
                                          "adaptvis:alpha1=0.5,alpha2=2,beta=0.5"],
                              batch_size=8, max_new_tokens=4, device="cpu", progress=False,
                              log=lambda m: None)
        total = time.perf_counter() - t0
    finally:
        store.CaptureWriter.write_batch, store.CaptureWriter.finalize = orig_write, orig_final
    return {"total": total, "writer": timer.seconds, "n": summary.n_total,
            "forward_per_sample": (total - timer.seconds) / summary.n_total}


def big_file(tmp: Path, n: int = 24) -> dict:
    """A working file shaped like a 7B LLaVA capture (L=H=32, G=24), float16 attention."""
    from vislens.data.base import Sample
    from vislens.decoding import parse_condition
    from vislens.store import CaptureWriter

    L, H, G = 32, 32, 24
    samples = [Sample(id=f"s{i}", image_path="", question="Where is the a in relation to the b?",
                      options=["Left", "Right", "On", "Under"], answer="Left") for i in range(n)]
    rng = np.random.default_rng(0)
    path = tmp / "big.h5"
    w = CaptureWriter.open(path, samples=samples, conditions=[parse_condition("baseline")], grid=G,
                           num_layers=L, num_heads=H, num_options=4, attrs={"model": "bench"})
    size_working = path.stat().st_size
    attn = rng.dirichlet(np.ones(G * G), size=(L, H)).reshape(L, H, G, G).astype(np.float16) * 0.3
    res = SimpleNamespace(text="Left", confidence=0.9, option_probs=np.array([0.9, 0.1, 0, 0]),
                          alpha_used=1.0, image_attention=attn,
                          image_mass=np.full((L, H), 0.3, np.float32),
                          text_mass=np.full((L, H), 0.7, np.float32), n_image_tokens=G * G,
                          n_text_tokens=40)
    t0 = time.perf_counter()
    for start in range(0, n, 8):
        rows = list(range(start, min(n, start + 8)))
        w.write_batch(rows, [{"baseline": res}] * len(rows), [{"baseline": True}] * len(rows))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    w.finalize()
    t_final = time.perf_counter() - t0
    w.close()
    return {"bytes_per_sample": size_working / n, "write_per_sample": t_write / n,
            "finalize_per_sample": t_final / n, "final_bytes_per_sample": path.stat().st_size / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=8, help="scene groups (4 scenes each)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r = real_capture(tmp, args.groups, args.hidden, args.layers)
        print(f"capture of {r['n']} samples x 4 conditions on a tiny LLaVA: {r['total']:.2f} s, "
              f"writer {r['writer']:.3f} s -> writer share {r['writer'] / r['total']:.1%} "
              f"(target <= 5%)")
        b = big_file(tmp)
        print(f"L=32,H=32,G=24 working file: {b['bytes_per_sample'] / 1e6:.3f} MB per sample and "
              f"condition before compression (target <= 1.2 MB); final (gzip) "
              f"{b['final_bytes_per_sample'] / 1e6:.3f} MB")
        print(f"write {b['write_per_sample'] * 1e3:.2f} ms + finalize "
              f"{b['finalize_per_sample'] * 1e3:.2f} ms per sample, vs the tiny model's "
              f"{r['forward_per_sample'] * 1e3:.1f} ms per sample -> ratio "
              f"{(b['write_per_sample'] + b['finalize_per_sample']) / r['forward_per_sample']:.3f} "
              "(a 7B forward is 10-100x slower than this tiny one)")


if __name__ == "__main__":
    main()
