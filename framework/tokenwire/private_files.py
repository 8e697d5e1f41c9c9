"""Files only the server's user may read: data directories 0700, data files 0600.

The server's files hold every tenant's conversations, the hashes of their API
keys and the keys of the audit log, so nothing it creates is readable by other
users of the machine, whatever the umask::

    make_private_dirs("var/tokenwire")                          # each missing level: 0700
    write_private_file("var/tokenwire/admin.key", b"tw_...\\n")  # 0600, atomically

Directories and files that already exist are not loosened or taken over: only
:func:`restrict_to_owner` changes an existing file, and only to remove access.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Final

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "create_private_file",
    "make_private_dirs",
    "restrict_to_owner",
    "write_private_file",
]

PRIVATE_DIR_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600


def make_private_dirs(path: str | os.PathLike[str]) -> None:
    """Create ``path`` and its missing parents with mode 0700; existing ones are left alone.

    Unlike ``Path.mkdir(parents=True)``, whose parents get the default mode,
    every level this call creates is private.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(target))
    missing: list[Path] = []
    for level in (target, *target.parents):
        if level.exists():
            break
        missing.append(level)
    for level in reversed(missing):
        try:
            os.mkdir(level, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # another process made it first: theirs, not ours to change
        # The umask can only take bits away; chmod so the owner keeps all three.
        os.chmod(level, PRIVATE_DIR_MODE)


def create_private_file(path: str | os.PathLike[str]) -> bool:
    """Create ``path`` empty with mode 0600 if it is missing; whether this call created it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever the umask
    finally:
        os.close(fd)
    return True


def write_private_file(path: str | os.PathLike[str], data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (a temp file, then rename).

    Readers see the old file or the whole new one, never a part. With
    ``replace=False`` an existing ``path`` is kept and FileExistsError raised, so
    of several processes racing to create the file exactly one wins.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), PRIVATE_FILE_MODE)  # whatever the umask
        if replace:
            os.replace(temp, target)
        else:
            os.link(temp, target)  # fails if target exists, unlike a rename
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def restrict_to_owner(path: str | os.PathLike[str]) -> None:
    """Take group and other access away from an existing file; quietly skip one we cannot.

    Missing files and files of another user (chmod is refused) are left as they are.
    """
    with contextlib.suppress(FileNotFoundError, PermissionError):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
