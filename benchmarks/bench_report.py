"""Streaming analysis speed and memory: ``vislens report`` on a 7B-shaped capture.

Builds a final (compressed) capture of N samples with L=32, H=32, G=24 and two conditions,
random but structured attention (answers are right more often when attention overlaps the
mask), then runs the report in a fresh process and prints samples per second and its peak
memory. Targets (analysis issue): 5,000 samples in under a minute on 2 cores, memory < 2 GB.

Usage: python benchmarks/bench_report.py [--n 400] [--keep DIR]   (--n 5000: the full target)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

L, H, G = 32, 32, 24


def build(path: Path, n: int, seed: int = 0) -> None:
    from vislens.data.base import Box, Sample
    from vislens.decoding import parse_condition
    from vislens.store import CaptureWriter

    rng = np.random.default_rng(seed)
    # a pool of sparse softmax-like maps, re-mixed per sample (drawing fresh Dirichlet maps
    # for every sample would make building a 5,000-sample file take half an hour)
    pool = rng.dirichlet(np.ones(G * G) * 0.5, size=(16, L, H)).astype(np.float32)
    samples, masks, boxes = [], np.zeros((n, G, G), np.float32), []
    for i in range(n):
        r, c = rng.integers(0, G - 6, size=2)
        masks[i, r:r + 6, c:c + 6] = 1
        box = Box("thing", (c * 2.0, r * 2.0, c * 2.0 + 12, r * 2.0 + 12))
        boxes.append([box])
        samples.append(Sample(id=f"s{i}", image_path="", question="Where is the thing?",
                              options=["Left", "Right"], answer="Left", relation="left"))
    conds = [parse_condition("baseline"), parse_condition("scaling:alpha=2")]
    w = CaptureWriter.open(path, samples=samples, conditions=conds, grid=G, num_layers=L,
                           num_heads=H, num_options=2, attrs={"model": "bench"},
                           box_masks=masks, boxes=boxes, sizes=[(48, 48)] * n)
    for start in range(0, n, 16):
        rows = list(range(start, min(n, start + 16)))
        results, correct = [], []
        for i in rows:
            focus = rng.random()
            base = np.roll(pool[rng.integers(len(pool))], rng.integers(G * G), axis=-1)
            attn = (1 - focus) * base.reshape(L, H, G, G) + focus * masks[i] / masks[i].sum()
            res = {}
            for cond in ("baseline", "scaling-2"):
                a = (attn * 0.3).astype(np.float16)
                res[cond] = SimpleNamespace(
                    text="Left", confidence=float(focus), option_probs=np.array([focus, 1 - focus]),
                    alpha_used=1.0, image_attention=a, image_mass=np.full((L, H), 0.3, np.float32),
                    text_mass=np.full((L, H), 0.7, np.float32), n_image_tokens=G * G,
                    n_text_tokens=40)
            ok = bool(rng.random() < 0.3 + 0.6 * focus)
            results.append(res)
            correct.append({"baseline": ok, "scaling-2": ok})
        w.write_batch(rows, results, correct)
    w.finalize()
    w.close()


def child(path: str, out: str) -> None:
    from vislens.report import write_report

    t = time.perf_counter()
    write_report(path, out)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--keep", help="keep the capture in this folder")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "bench.h5"
        path.unlink(missing_ok=True)
        t = time.perf_counter()
        build(path, args.n)
        print(f"built {args.n}-sample capture (L={L}, H={H}, G={G}, 2 conditions): "
              f"{path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        res = subprocess.run([sys.executable, __file__, "--child", str(path), str(folder / "report")],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rate = args.n / r["seconds"]
        print(f"report: {r['seconds']:.1f} s -> {rate:.0f} samples/s (both conditions); "
              f"5,000 samples would take ~{5000 / rate:.0f} s (target < 60 s); "
              f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB (target < 2 GiB)")


if __name__ == "__main__":
    main()
