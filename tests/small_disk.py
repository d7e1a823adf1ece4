"""A small real filesystem for disk-full and read-only tests: a tmpfs mounted in tmp_path.

Mounting needs root (containers and CI usually run as root); elsewhere the tests that need
a real full disk inject ``ENOSPC`` at the write layer instead, and skip only where neither
is possible. Import the fixtures into a test module: ``from small_disk import small_disk``.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest


def _mount(path: Path, options: str) -> bool:
    # VISLENS_TEST_NO_MOUNT=1 runs the fallbacks (injected ENOSPC) as a non-root user would
    if os.geteuid() != 0 or os.environ.get("VISLENS_TEST_NO_MOUNT") == "1":
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """``make(size="3m", ro=False)`` -> a fresh mounted tmpfs folder, or None if mounting
    is not possible here (not root, no mount permission)."""
    mounted: list[Path] = []

    def make(size: str = "3m", ro: bool = False) -> Path | None:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if not _mount(d, f"size={size}" + (",ro" if ro else "")):
            return None
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the filesystem of ``folder`` is full; returns it."""
    filler = folder / "filler"
    block = b"\0" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for size in (4096, 512, 1):  # the last partial blocks
        try:
            with open(filler, "ab") as fh:
                while True:
                    fh.write(b"\0" * size)
                    fh.flush()
        except OSError:
            pass
    return filler


def read_only_folder(small_disk, tmp_path: Path) -> Path:
    """A folder this process cannot write: a read-only tmpfs as root, chmod 555 otherwise."""
    if os.geteuid() == 0:
        d = small_disk("1m", ro=True)
        if d is None:
            pytest.skip("cannot mount a read-only filesystem here (root ignores chmod)")
        return d
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def make_read_only(folder: Path) -> None:
    """Make a folder (a mounted tmpfs as root, any folder otherwise) unwritable."""
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot remount read-only here")
    else:
        folder.chmod(0o555)
