"""How many 7B-class GPUs one capture writer can feed (the design figure of docs/scale.md).

A ``--ray`` capture streams every worker's results to one writer in the driver. This script
measures, for 7B-LLaVA-shaped rows (L=32, H=32, G=24 float16: 1.18 MB of attention per
sample and condition):

1. the writer alone: ``CaptureWriter.write_batch`` into the working file, MB/s of attention;
2. the Ray path into it: a Ray actor returns the batches (as ``BatchOutput``, like a
   worker) and the driver ``ray.get``s and writes them, MB/s end to end (transfer through
   the object store + deserialisation + write);
3. ``finalize`` (gzip compaction, once at the end), MB/s.

and divides the end-to-end rate by what one GPU produces: ``--gpu-rows-per-s`` sample-
conditions per second (default: the ceiling of an H200 at its full bf16 peak with one
~8.4 TFLOP prefill per sample and condition, 989 / 8.4 = 118/s; real captures are slower).

Usage: python benchmarks/bench_ray.py [--samples 64] [--conditions 4] [--batch-size 16]
                                      [--no-ray] [--gpu-rows-per-s 118]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

L, H, G = 32, 32, 24
ROW_MB = L * H * G * G * 2 / 1e6


def make_batches(n: int, conds: list[str], batch: int, seed: int = 0):
    """BatchOutput-shaped payloads with real ConditionResult objects."""
    from vislens.conditions import ConditionResult
    from vislens.distributed import BatchOutput

    rng = np.random.default_rng(seed)
    attn = (rng.dirichlet(np.ones(G * G), size=(L, H)).reshape(L, H, G, G) * 0.3
            ).astype(np.float16)
    mass = np.full((L, H), 0.3, np.float32)
    out = []
    for start in range(0, n, batch):
        rows = list(range(start, min(n, start + batch)))
        results = [{c: ConditionResult("Left", 0, 0.9, np.array([0.9, 0.1, 0.0, 0.0]), 1.0,
                                       attn.copy(), mass, 1 - mass, 576, 40) for c in conds}
                   for _ in rows]
        out.append(BatchOutput(rows, results, [(640, 480)] * len(rows), []))
    return out


def open_writer(path: Path, n: int, conds: list[str]):
    from vislens.data.base import Sample
    from vislens.conditions import parse_condition
    from vislens.store import CaptureWriter

    samples = [Sample(id=f"s{i}", image_path="", question="Where is the a in relation to the b?",
                      options=["Left", "Right", "On", "Under"], answer="Left") for i in range(n)]
    specs = ["baseline"] + [f"scaling:alpha={a},name={c}" for a, c in
                            zip((0.5, 2.0, 1.5, 0.8, 1.2, 0.6), conds[1:])]
    return CaptureWriter.open(path, samples=samples, conditions=[parse_condition(s) for s in specs],
                              grid=G, num_layers=L, num_heads=H, num_options=4,
                              attrs={"model": "bench"})


def write_all(writer, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        writer.write_batch(b.rows, b.results, [{c: True for c in r} for r in b.results],
                           sizes=b.sizes)
    return time.perf_counter() - t0


class Producer:
    """A Ray actor standing in for a worker: returns prepared BatchOutputs."""

    def __init__(self, n: int, conds: list[str], batch: int) -> None:
        self.batches = make_batches(n, conds, batch)

    def get(self, k: int):
        return self.batches[k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--conditions", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-ray", action="store_true", help="only the writer (no Ray cluster)")
    ap.add_argument("--gpu-rows-per-s", type=float, default=989 / 8.4,
                    help="sample-conditions per second one GPU produces (default: H200 ceiling)")
    args = ap.parse_args()
    n, batch = args.samples, args.batch_size
    conds = ["baseline"] + [f"c{k}" for k in range(1, args.conditions)]
    mb = n * len(conds) * ROW_MB
    print(f"{n} samples x {len(conds)} conditions, L={L} H={H} G={G}: {mb:.0f} MB of attention")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        batches = make_batches(n, conds, batch)
        w = open_writer(tmp / "a.h5", n, conds)
        t_write = write_all(w, batches)
        t0 = time.perf_counter()
        w.finalize()
        t_final = time.perf_counter() - t0
        w.close()
        print(f"1. writer alone: {mb / t_write:.0f} MB/s ({t_write:.2f} s)")
        print(f"3. finalize (gzip 1, once at the end): {mb / t_final:.0f} MB/s ({t_final:.2f} s)")
        rate = mb / t_write
        if not args.no_ray:
            import ray

            from vislens.distributed import start_local_cluster

            cluster = start_local_cluster(num_cpus=2, log=print)
            try:
                actor = ray.remote(Producer).options(num_cpus=1).remote(n, conds, batch)
                ray.get(actor.get.remote(0))  # warm up (actor start)
                w = open_writer(tmp / "b.h5", n, conds)
                t0 = time.perf_counter()
                refs = [actor.get.remote(k) for k in range(len(batches))]
                got = 0
                for ref in refs:
                    b = ray.get(ref)
                    w.write_batch(b.rows, b.results, [{c: True for c in r} for r in b.results],
                                  sizes=b.sizes)
                    got += len(b.rows)
                t_ray = time.perf_counter() - t0
                w.close()
                assert got == n
                rate = mb / t_ray
                print(f"2. Ray worker -> driver -> writer: {rate:.0f} MB/s ({t_ray:.2f} s)")
            finally:
                cluster.close()
        gpu_mb = args.gpu_rows_per_s * ROW_MB
        print(f"one GPU produces at most {args.gpu_rows_per_s:.0f} sample-conditions/s = "
              f"{gpu_mb:.0f} MB/s -> one writer feeds {rate / gpu_mb:.1f} such GPUs")


if __name__ == "__main__":
    main()
