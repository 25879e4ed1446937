"""Checkpoints are data: every checkpoint or weight file a user names is read as tensors and plain values.

A torch checkpoint is a pickle, and unpickling runs whatever the file asks for. So every file
this project is handed (``au-detect predict --model``, ``--ckpt_path`` of fit/validate/test,
branch weights, the run id a resume continues, the MLflow model's weights) is read with
``weights_only=True``: tensors, numbers, strings, lists, dicts and the few containers torch
allows, nothing else. Lightning's own checkpoints hold only such values, so nothing is lost;
a file that needs more is refused with an error naming the file and the object it asked for.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any


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
