"""Files written whole or not at all: a reader, or the next run after a kill, never sees half of one.

Reports, manifests and markers that say "this is complete" are written under a temporary name in
the same folder, flushed to the disk, and renamed onto their name (a rename is atomic on POSIX).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def write_text(path: str | os.PathLike, text: str, only_if_changed: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically and durably; with ``only_if_changed`` an identical
    file is left untouched (its mtime, and what is keyed on it, stay)."""
    path = Path(path)
    if only_if_changed and path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def umask() -> int:
    """This process's umask, read without changing it where Linux says it (``/proc``): setting it
    to read it would, for a moment, apply another mask to files other threads create."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a plain ``open()`` would (0666 less the umask): a file from
    ``tempfile.mkstemp`` is owner-only, which a reader under another account cannot open."""
    os.chmod(path, 0o666 & ~umask())


def sync(path: str | os.PathLike) -> None:
    """Flush a file written by other means (numpy, a memory map) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(tmp: str | os.PathLike, root: str | os.PathLike) -> None:
    """Put ``tmp``, a folder written whole beside ``root``, in ``root``'s place by renames: a data
    set being written is never visible under its name. An existing ``root`` is moved aside first
    and removed once the new one is in place."""
    tmp, root = Path(tmp), Path(root)
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}"
        os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, root)

