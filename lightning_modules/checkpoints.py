"""Checkpoints are data: every checkpoint or weight file a user names is read as tensors and plain values.

A torch checkpoint is a pickle, and unpickling runs whatever the file asks for. So every file
this project is handed (``au-detect predict --model``, ``--ckpt_path`` of fit/validate/test,
branch weights, the run id a resume continues, the MLflow model's weights) is read with
``weights_only=True``: tensors, numbers, strings, lists, dicts and the few containers torch
allows, nothing else. Lightning's own checkpoints hold only such values, so nothing is lost;
a file that needs more is refused with an error naming the file and the object it asked for.

Checkpoints are written whole or not at all (:func:`save_atomically`, which the training CLI's
Trainer uses for every save: :class:`callbacks.preemption.AtomicCheckpointIO`): the bytes go to a temporary file beside the
destination, are synced to disk, and then replace the destination in one rename. A kill, a full
disk or a failing write leaves the previous file as it was. (Lightning's own save writes its
temporary file in ``$TMPDIR``; where that is another filesystem than the checkpoint folder, node-local
``/tmp`` or tmpfs, its final step is a copy into the destination, which a kill or a full disk tears.)
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import socket
import tempfile
from pathlib import Path
from typing import Any

from datamodules.io.files import apply_umask


PARTIAL = ".partial"  # the suffix of a checkpoint being written (never matched by *.ckpt)


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be read as data; the message names the file."""


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """The content of a torch file, read as tensors and plain values only (on the CPU).

    ``what`` names the file's role in messages (``"checkpoint"``, ``"backbone weights"``).
    The file is memory-mapped, so reading a few keys of a large checkpoint is cheap.
    Raises ``FileNotFoundError`` or :class:`CheckpointError`.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        # torch says why on lines of their own: a refused object ("unsupported GLOBAL posix.system"),
        # or bytes that are no pickle at all ("Unsupported operand 110").
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        named = next((line for line in lines if "GLOBAL" in line), None)
        if named is None:
            reason = next((line for line in lines[1:] if not line.startswith(("Please file", "Check the"))), lines[-1])
            raise CheckpointError(f"{what} {path}: not a readable torch checkpoint ({reason[:200]})") from None
        raise CheckpointError(
            f"{what} {path}: refused, it holds objects that are not tensors or plain values, and unpickling "
            f"them could run code ({named[:300]}). Save the weights as a state dict (or safetensors) instead."
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file makes torch raise many kinds; nothing was run
        raise CheckpointError(f"{what} {path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); is the file complete?") from None


def save_atomically(checkpoint: Any, path: str | os.PathLike) -> None:
    """``torch.save(checkpoint, path)``, all or nothing: written to ``.<name>.<host>.<pid>.<random>.partial``
    in the same folder, flushed and synced, then renamed over ``path`` (and the folder synced).

    Raises ``OSError`` (with the failed write's errno, e.g. ENOSPC) whose message names the file and
    says that the previous one is kept; the partial file is removed. Partial files that a killed
    process of this host left for the same destination are removed first.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_")
    for stale in path.parent.glob(f".{path.name}.{host}.*{PARTIAL}"):
        try:
            pid = int(stale.name[len(f".{path.name}.{host}."):].split(".", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            stale.unlink(missing_ok=True)
    # Serialised first (as Lightning does): torch.save writing to a file turns a failed write
    # (ENOSPC) into a RuntimeError without its errno.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{host}.{os.getpid()}.", suffix=PARTIAL)
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); a checkpoint gets the mode any new file would
        if path.exists():
            os.chmod(partial, path.stat().st_mode & 0o777)
        else:
            apply_umask(partial)
        os.replace(partial, path)
    except BaseException as e:
        partial.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        kept = "the previous one is kept as it was" if path.exists() else "there was none before"
        code = e.errno if e.errno is not None else errno.EIO
        raise OSError(code, f"checkpoint {path} was not written ({e.strerror or e}); {kept}") from e
    try:  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:  # some filesystems do not sync folders; the rename is still atomic
        pass
    finally:
        os.close(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

