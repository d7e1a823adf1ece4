"""Output paths every command writes through: one rule, one-line errors.

The rule (issue 11): a command may create a file or folder, or rewrite one it created
itself (a capture resumes its own working file; a report folder carries the marker file
:data:`MARKER`), but never replaces anything else unless the user passes ``--force``. A
missing or read-only output folder, or a full disk, is reported in one line naming the
path before any work starts. A command that fails before writing into an output folder it
claimed leaves no trace of the claim (:func:`unclaim_on_failure`).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import VislensError

__all__ = ["MARKER", "human_bytes", "os_reason", "real_path", "check_folder", "check_output",
           "prepare_output_dir", "unclaim_on_failure", "check_free_space", "error_code", "is_disk_full",
           "IO_ERRORS", "add_force_argument"]

#: what a failed read or write of an HDF5 file raises (h5py maps some HDF5 I/O failures,
#: e.g. a flush on a full disk, to RuntimeError)
IO_ERRORS = (OSError, RuntimeError)

#: a folder holding this file was created by a vislens command (which may write into it again)
MARKER = ".vislens-output"


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal, never "0.00 GB"."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def os_reason(exc: BaseException) -> str:
    """Short reason of an OS (or HDF5 I/O) error: ``"No space left on device"``.

    h5py's messages for failed writes run over several lines with buffer addresses; the
    errno says the same thing in a few words.
    """
    code = error_code(exc)
    if code:
        return os.strerror(code)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_code(exc: BaseException) -> int | None:
    """The errno of an OS error, also when HDF5 reports it only in its message (h5py raises
    some failed flushes as ``RuntimeError("... errno = 28, ...")``)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return code
    m = re.search(r"errno = (\d+)", str(exc))
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


def real_path(path: str | Path) -> Path:
    """``path`` with every symlink resolved (a dangling link gives its target).

    Writers lock and replace the real file, so two jobs given different links to one file
    still exclude each other and a symlinked output stays a symlink.
    """
    return Path(os.path.realpath(Path(path).expanduser()))


def check_folder(path: str | Path, what: str = "output") -> Path:
    """The folder that will hold ``path`` must exist and be writable; returns it."""
    folder = real_path(path).parent
    if not folder.is_dir():
        raise VislensError(f"{path}: {what} folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(folder) else "permission denied"
        raise VislensError(f"{path}: {what} folder {folder} is not writable ({why})")
    return folder


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output(path: str | Path, *, force: bool = False, kind: str = "file",
                 flag: str = "--force") -> Path:
    """Refuse to overwrite what this command did not create, unless ``force``.

    ``kind="file"``: an existing ``path`` is refused. ``kind="folder"``: an existing folder
    is accepted when it is empty or holds :data:`MARKER` (a vislens output folder, written
    by :func:`prepare_output_dir`). The folder that will hold ``path`` must exist and be
    writable either way. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind={kind!r}: choose file or folder")
    if kind == "folder" and not path.exists():
        _nearest_writable(path)
        return path
    check_folder(path)
    if not path.exists():  # also a dangling link: its target is created
        return path
    if force:
        return path
    if kind == "file":
        what = "a folder" if path.is_dir() else "a file"
        raise VislensError(f"{path} already exists ({what} this command did not create); "
                           f"choose another name or pass {flag} to replace it")
    if not path.is_dir():
        raise VislensError(f"{path} exists and is not a folder; choose another output folder")
    if (path / MARKER).exists() or not any(path.iterdir()):
        if not os.access(path, os.W_OK | os.X_OK):
            raise VislensError(f"{path}: output folder is not writable")
        return path
    raise VislensError(f"{path} is a folder vislens did not create and it is not empty; "
                       f"choose another output folder or pass {flag} to write into it")


def _nearest_writable(path: Path) -> None:
    """A folder to be created: its nearest existing ancestor must be a writable folder."""
    parent = real_path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise VislensError(f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(parent) else "permission denied"
        raise VislensError(f"{path}: cannot create the output folder in {parent} ({why})")


@dataclass
class _Claim:
    """What :func:`prepare_output_dir` did to one folder, so a failed command can undo it."""

    path: Path  # absolute
    created: list[Path]  # folders it made, the output folder first, then its new parents
    marked: bool  # it added the marker to a folder that existed without one
    before: frozenset | None  # that existing folder's entries then (name, size, mtime)


_claims: list[_Claim] = []


def _entries(folder: Path) -> frozenset:
    """The folder's entries but the marker, as (name, size, mtime): what a run may change."""
    out = set()
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name != MARKER:
                st = entry.stat(follow_symlinks=False)
                out.add((entry.name, st.st_size, st.st_mtime_ns))
    return frozenset(out)


def prepare_output_dir(path: str | Path, *, force: bool = False, flag: str = "--force") -> Path:
    """:func:`check_output` for a folder, then create it and mark it as a vislens output.

    The claim is remembered so that :func:`unclaim_on_failure` can take it back."""
    path = check_output(path, force=force, kind="folder", flag=flag)
    full = Path(os.path.abspath(path))
    created = []
    missing = full
    while not os.path.lexists(missing) and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    marked = not created and not (full / MARKER).exists()
    before = _entries(full) if marked else None
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()
    except OSError as exc:
        raise VislensError(f"{path}: cannot create the output folder ({os_reason(exc)})") from None
    _claims.append(_Claim(full, created, marked, before))
    return path


@contextmanager
def unclaim_on_failure() -> Iterator[None]:
    """Run a command; if it fails, undo the output folders it claimed and wrote nothing into.

    A folder :func:`prepare_output_dir` created that holds only the marker is removed again,
    with the parents it created for it (while empty); a folder that existed keeps its
    entries and loses only a marker this run added. Anything written is kept (a resumable
    partial output, or what the user must see); the command's error propagates unchanged.
    """
    start = len(_claims)
    try:
        yield
    except BaseException:
        for claim in reversed(_claims[start:]):
            _unclaim(claim)
        raise
    finally:
        del _claims[start:]


def _unclaim(claim: _Claim) -> None:
    marker = claim.path / MARKER
    try:
        if claim.created:
            if os.listdir(claim.path) != [MARKER]:
                return
            marker.unlink()
            for folder in claim.created:  # rmdir refuses a folder something else filled
                os.rmdir(folder)
        elif claim.marked and _entries(claim.path) == claim.before:
            marker.unlink()
    except OSError:
        pass  # best effort: never hide the command's own error


def check_free_space(path: str | Path, need: int, what: str) -> None:
    """Refuse (one line, readable units) when the folder of ``path`` has < ``need`` bytes free."""
    folder = real_path(path).parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise VislensError(f"{path}: {what} needs {human_bytes(need)} but only "
                           f"{human_bytes(free)} are free in {folder}")


def is_disk_full(exc: BaseException) -> bool:
    return error_code(exc) in (errno.ENOSPC, errno.EDQUOT)


def add_force_argument(parser, help: str = "write into an existing folder vislens did not create"
                       ) -> None:
    """``--force`` on a command that writes a file or folder (the rule above, in one place)."""
    parser.add_argument("--force", action="store_true", help=help)
