"""``vislens view`` on a 7B-shaped capture: time to first page and peak memory.

Builds a final capture of N samples (L=32, H=32, G=24, two conditions; the builder of
``bench_report.py``), then, in a fresh process, opens the viewer's server and times what a
user does first: the page's meta and sample list, the first before/after maps, 31 slider
steps on the same sample (cached), and 20 other samples; it prints the times and the peak
RSS. The viewer reads one sample at a time, so peak memory should not grow with N
(compare --n 200 with --n 800). Targets: open + first maps < 2 s, a slider step < 50 ms.

Usage: python benchmarks/bench_view.py [--n 200] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import L, build  # noqa: E402  (one builder for both benchmarks)


def child(path: str) -> None:
    from vislens.viewer import ViewerServer

    def get(url: str) -> dict:
        with urllib.request.urlopen(url, timeout=120) as r:
            return json.loads(r.read())

    times = {}
    t = time.perf_counter()
    srv = ViewerServer(path, port=0).start()
    base = srv.url + "api/"
    meta = get(base + "meta")
    get(base + "samples?condition=scaling-2")
    times["open + meta + list"] = time.perf_counter() - t
    t = time.perf_counter()
    get(base + "maps?row=0&a=baseline&b=scaling-2&layer=16")
    times["first maps"] = time.perf_counter() - t
    t = time.perf_counter()
    for layer in range(L):
        if layer != 16:
            get(base + f"maps?row=0&a=baseline&b=scaling-2&layer={layer}")
    times["slider step (mean)"] = (time.perf_counter() - t) / (L - 1)
    t = time.perf_counter()
    rows = range(1, min(21, meta["n_samples"]))
    for row in rows:
        get(base + f"sample?row={row}")
        get(base + f"maps?row={row}&a=baseline&b=scaling-2&layer=16")
    times["new sample (mean)"] = (time.perf_counter() - t) / len(rows)
    srv.close()
    print(json.dumps({"times": times,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--keep", help="keep the capture in this folder (reused when it exists)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    if args.build:
        build(Path(args.build), args.n)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"bench-view-{args.n}.h5"
        if not path.exists():
            t = time.perf_counter()
            # in its own process: a child forked from a big parent inherits its peak RSS
            subprocess.run([sys.executable, __file__, "--n", str(args.n), "--build", str(path)],
                           check=True)
            print(f"built {args.n}-sample capture: {path.stat().st_size / 1e9:.2f} GB in "
                  f"{time.perf_counter() - t:.0f} s")
        res = subprocess.run([sys.executable, __file__, "--child", str(path)],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        for name, sec in r["times"].items():
            print(f"{name:>20}: {sec * 1000:8.1f} ms")
        print(f"{'peak RSS':>20}: {r['peak_rss'] / 2**20:8.0f} MiB "
              f"({path.stat().st_size / 2**20:.0f} MiB file)")


if __name__ == "__main__":
    main()
