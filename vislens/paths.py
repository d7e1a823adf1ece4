"""Where vislens finds the files of its repository checkout (one answer for every module).

The committed model organism (``data/organism``), the demo's capture and the notebooks'
``figures/`` folder live beside the package in a source checkout. :func:`repo_root` finds
that checkout; an installed vislens (no ``pyproject.toml`` above the package) uses the
current directory instead.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["PACKAGE_DIR", "repo_root", "organism_path"]

#: the ``vislens`` package folder
PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml`` above the package), else cwd."""
    here = PACKAGE_DIR.parent
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd()


def organism_path() -> Path:
    """Where the committed model organism lives (``data/organism`` in the repository)."""
    return repo_root() / "data" / "organism"
