"""Atomic file and folder writes: output appears complete or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def check_writable_parent(dest: Path) -> None:
    """Fail early, in one line, if `dest` cannot be created."""
    parent = Path(dest).resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {dest}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {dest}: folder {parent} is not writable")


@contextlib.contextmanager
def staged_dir(dest: Path, replace_existing: bool = False):
    """Yield a temporary sibling folder; on success it becomes `dest`, on any failure it is removed."""
    dest = Path(dest)
    if dest.exists() and not replace_existing:
        raise UserError(f"{dest} already exists (use --force to replace it)")
    check_writable_parent(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.resolve().parent))
    try:
        yield tmp
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, dest: Path) -> None:
    """Move the finished folder into place; an existing one is removed only after the move succeeded."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path, mode: str = "wb"):
    """Yield a file object on a temporary sibling; it replaces `dest` only when the block succeeds."""
    dest = Path(dest)
    check_writable_parent(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.resolve().parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
