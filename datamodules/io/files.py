"""Files written whole or not at all: a reader, or the next run after a kill, never sees half of one.

Reports, manifests and markers that say "this is complete" are written under a temporary name in
the same folder, flushed to the disk, and renamed onto their name (a rename is atomic on POSIX).
"""

from __future__ import annotations

import os
import secrets
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


def sync(path: str | os.PathLike) -> None:
    """Flush a file written by other means (numpy, a memory map) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
