"""The 7B-shaped capture builder shared by benchmarks/bench_report.py and bench_view.py still
writes a capture the reader accepts (a stale builder made both benchmarks crash unnoticed)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_report  # noqa: E402


def test_bench_builder_writes_a_readable_7b_shaped_capture(tmp_path):
    from vislens.store import open_capture

    path = tmp_path / "bench.h5"
    bench_report.build(path, 3)
    with open_capture(path) as cap:
        assert cap.complete and len(cap) == 3
        a = cap.attention("baseline", [0, 2])
        assert a.shape == (2, bench_report.L, bench_report.H, bench_report.G, bench_report.G)
        # each head's row: 0.3 of the mass on the image, stored as float16
        np.testing.assert_allclose(a.astype(np.float64).sum(axis=(-2, -1)), 0.3, rtol=2e-2)
