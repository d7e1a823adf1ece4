"""One writer per output file: ``FILE.lock`` held with ``flock`` for the writer's lifetime."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


from ..errors import VislensError
from ..io import check_folder, os_reason, real_path


class OutputLock:
    """Exclusive ``FILE.lock`` held with ``flock`` (the OS drops it when the process dies).

    ``target`` is resolved first (symlinks), so every job writing one real file takes the
    same lock. A missing or read-only folder is refused in one line.
    """

    def __init__(self, target: Path) -> None:
        shown = target
        target = real_path(target)
        check_folder(shown)
        self.path = target.with_name(target.name + ".lock")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise VislensError(f"{shown}: cannot create the lock file {self.path} "
                                   f"({os_reason(exc)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise VislensError(f"{shown} is being written by another vislens job (pid {pid})")
            try:  # a releasing holder may have unlinked the file we opened: retry on the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:  # the pid is only for the "being written by" message; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # unlink while still holding the lock, so no one can lock a stale inode
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def lock_output(path: str | Path) -> OutputLock:
    """Take ``path``'s one-writer lock now (e.g. before loading a model); pass it to
    :meth:`CaptureWriter.open` as ``lock=``. Release with ``.release()``."""
    return OutputLock(Path(path))
