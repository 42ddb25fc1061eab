"""Atomic file and folder writes: output appears complete or not at all."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def _disk_full(e: BaseException, dest: Path, existed: bool, what: str) -> UserError | None:
    """A one-line error for a full disk (or exceeded quota), else None."""
    if not isinstance(e, OSError) or e.errno not in DISK_FULL:
        return None
    kept = f"the existing {what} was kept" if existed else "nothing was written"
    return UserError(f"disk full while writing {dest} ({e.strerror or 'no space left on device'}); {kept}")


def _umask() -> int:
    """The process umask, read from /proc where Linux reports it: setting and restoring it (the portable way)
    briefly changes it for every thread, which a server writing files from several threads must not do."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_mode(directory: bool) -> int:
    """Permissions a plain mkdir / open gets under the umask (0755 / 0644 under 022), as save_pretrained's files."""
    return (0o777 if directory else 0o666) & ~_umask()


def check_writable_parent(dest: Path) -> None:
    """Fail early, in one line, if `dest` cannot be created."""
    parent = Path(dest).resolve().parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot write {dest}: {parent} is a file, not a folder")
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
    existed = dest.exists()
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.resolve().parent))
        os.chmod(tmp, _umask_mode(directory=True))          # mkdtemp makes it private (0700)
        yield tmp
        _swap_in(tmp, dest)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(e, dest, existed, "folder")
        if full is not None:
            raise full from None
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
    if dest.is_dir():
        raise UserError(f"cannot write {dest}: it is a folder")
    check_writable_parent(dest)
    existed = dest.exists()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.resolve().parent)
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, _umask_mode(directory=False))     # mkstemp makes it private (0600)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        full = _disk_full(e, dest, existed, "file")
        if full is not None:
            raise full from None
        raise
