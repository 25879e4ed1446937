"""The processes of a distributed job, as data preparation sees them.

Alignment spreads a manifest's images over every rank of the job (GPUs of one node, or nodes),
the way torchrun and Lightning start them: torch.distributed, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.
The job's own group may be NCCL (Lightning on GPUs), which carries no Python objects without a
device; preparation talks through a gloo group of the same ranks instead, made once per process,
whose timeout is long because a rank that finished its share waits at the barrier for the slowest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# A share of a million images on a slow rank takes hours; the default 30 minutes would cut it.
TIMEOUT = timedelta(hours=24)
_GROUP: dict[str, Any] = {}


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world``, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> "Ranks":
        """The initialised process group's ranks (one rank when there is none)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    @classmethod
    def from_env(cls) -> "Ranks":
        """Join the job torchrun describes in the environment (``WORLD_SIZE`` > 1), over gloo;
        alone otherwise. Commands that are not Lightning's (``au-detect align``) start here."""
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)
        return cls.current()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _group(self):
        if "gloo" not in _GROUP:  # collective: every rank makes it, at its first exchange
            _GROUP["gloo"] = dist.new_group(backend="gloo", timeout=TIMEOUT)
        return _GROUP["gloo"]

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group())
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._group())
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._group())

    def device(self) -> str | None:
        """The GPU of this rank when there are GPUs (``cuda:<local rank>``); None lets the caller choose."""
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return None
