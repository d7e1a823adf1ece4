"""The 7B-shaped capture builders of benchmarks/ (bench_report.py, shared by bench_view.py, and
bench_capture.py) still write captures the reader accepts (stale builders made the
benchmarks crash unnoticed)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_capture  # noqa: E402
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


def test_bench_capture_big_file_runs(tmp_path):
    out = bench_capture.big_file(tmp_path, n=2)
    # random float16 maps hardly compress: the final file keeps over a byte per stored value
    assert out["final_bytes_per_sample"] > 32 * 32 * 24 * 24
    assert out["write_per_sample"] > 0 and out["finalize_per_sample"] > 0
