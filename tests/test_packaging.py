"""Packaging metadata: the build reads pyproject.toml without deprecation warnings."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    from packaging.requirements import Requirement
    from packaging.version import Version

    meta = _tomllib().loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["license"] == "MIT"
    req = [Requirement(r) for r in meta["build-system"]["requires"]]
    setuptools = next(r for r in req if r.name == "setuptools")
    # SPDX strings need setuptools >= 77: the floor of the build requirement must admit no older one
    assert not any(setuptools.specifier.contains(v) for v in ("68", "76.1", "76.99"))
    assert setuptools.specifier.contains(Version("77.0.0"))


def test_metadata_build_prints_no_deprecation_warning(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    from packaging.version import Version

    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot read SPDX license strings")
    src = tmp_path / "src"
    (src / "vislens").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (src / "vislens" / "__init__.py").write_text("")
    (src / "vislens" / "py.typed").write_text("")
    meta = tmp_path / "meta"
    meta.mkdir()
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always")
        from setuptools import build_meta
        print(build_meta.prepare_metadata_for_build_wheel({str(meta)!r}))
    """)
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    run = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    output = run.stdout + run.stderr
    assert "deprecat" not in output.lower(), output[-3000:]
    dist_info = meta / run.stdout.strip().splitlines()[-1]
    metadata = (dist_info / "METADATA").read_text(encoding="utf-8")
    assert "License-Expression: MIT" in metadata.splitlines()


def test_the_model_card_template_ships_as_package_data():
    meta = _tomllib().loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "organism/model_card.md" in meta["tool"]["setuptools"]["package-data"]["vislens"]
    assert (ROOT / "vislens" / "organism" / "model_card.md").is_file()
