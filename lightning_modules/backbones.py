"""ResNet branches from timm, with weights from a local checkpoint, timm's hub, or a random start.

A weight source is one string:
    ``None`` or ``"random"``   random initialisation (said so in the log, never implied)
    ``"timm"``                 timm's pretrained weights for the architecture (needs the network)
    a file path                a checkpoint: ``.safetensors``, or a torch file read with
                               ``weights_only=True`` (tensors only, no pickled code). Lightning
                               checkpoints (``state_dict``), ``{"model": ...}`` dicts and plain
                               state dicts all work; ``module.``/``backbone.``/``model.`` prefixes
                               are stripped until the keys match the network.
A source that cannot be had raises :class:`WeightsError` saying what was asked and why it
failed: a run never starts from random weights it did not ask for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import timm
import torch
from torch import nn

from lightning_modules.checkpoints import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

# The ResNets this project trains and loads, by timm name: the method's ResNet-18/50/152, their
# neighbours in depth, and timm's deep-stem ("d") and tiered-stem ("t") variants. A name is the
# whole architecture, so a saved config naming a ResNet-like giant (resnetv2_152x4_bit, 936M
# parameters) is refused before timm allocates it.
RESNETS = ("resnet10t", "resnet14t", "resnet18", "resnet18d", "resnet26", "resnet26d", "resnet34", "resnet34d",
           "resnet50", "resnet50d", "resnet101", "resnet101d", "resnet152", "resnet152d")
STRIPPABLE_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "net.", "_orig_mod.")
CHECKPOINT_CONTAINERS = ("state_dict", "model", "model_state_dict", "net", "backbone")


class WeightsError(RuntimeError):
    """Backbone weights were asked for and could not be had."""


@dataclass
class LoadReport:
    """What loading a checkpoint into a branch did."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.source}: {self.loaded} tensors loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected" + (f" (prefixes stripped: {self.stripped})" if self.stripped else ""))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"backbone weights {path}: no such file (a branch checkpoint is written by "
                           "`au-detect pretrain-face|pretrain-expression fit`, or by `au-detect pipeline` with the "
                           "rest of the method; null starts the branch from random weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear error
            raise WeightsError(f"backbone weights {path}: not a readable safetensors file "
                               f"({type(e).__name__}: {e})") from None
    else:
        try:
            obj = load_checkpoint(path, "backbone weights")
        except CheckpointError as e:
            raise WeightsError(str(e)) from None
    for _ in range(3):  # unwrap {"state_dict": {...}} and the like
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in CHECKPOINT_CONTAINERS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"backbone weights {path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _match_keys(state: dict[str, torch.Tensor], wanted: set[str], depth: int = 3) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the sequence of known prefixes (up to ``depth``, e.g. ``model.`` then ``backbone.``)
    that makes the most keys match the network; the shortest such sequence wins ties."""
    best_state, best_strip = state, []
    best_hits = sum(k in wanted for k in state)
    frontier = [(state, [])]
    for _ in range(depth):
        nxt = []
        for current, stripped in frontier:
            for prefix in STRIPPABLE_PREFIXES:
                if not any(k.startswith(prefix) for k in current):
                    continue
                trial = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in current.items()}
                nxt.append((trial, stripped + [prefix]))
                hits = sum(k in wanted for k in trial)
                if hits > best_hits:
                    best_state, best_strip, best_hits = trial, stripped + [prefix], hits
        frontier = nxt
    return best_state, best_strip


def load_backbone_weights(model: nn.Module, path: str | Path, allow_missing: bool = False) -> LoadReport:
    """Load a local checkpoint into ``model``; raise unless every backbone tensor arrives."""
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    state, stripped = _match_keys(state, set(own))
    report = LoadReport(str(path), stripped=stripped)
    usable = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            raise WeightsError(f"backbone weights {path}: {k} has shape {tuple(v.shape)}, the network "
                               f"expects {tuple(own[k].shape)} (another architecture?)")
        else:
            usable[k] = v
    report.missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    report.loaded = len(usable)
    if not usable:
        raise WeightsError(f"backbone weights {path}: no tensor matches the network "
                           f"(first keys in the file: {list(state)[:5]})")
    if report.missing and not allow_missing:
        raise WeightsError(f"backbone weights {path}: {len(report.missing)} tensors of the network are not in "
                           f"the file (first: {report.missing[:5]}); pass allow_missing to accept a partial start")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %s", report)
    return report


def check_backbone(name) -> str:
    """``name`` if it is one of :data:`RESNETS`, else a ``ValueError`` listing them."""
    if not isinstance(name, str) or name not in RESNETS:
        raise ValueError(f"backbone {name!r} is not a timm ResNet this project builds; expected one of "
                         f"{', '.join(RESNETS)}")
    return name


def create_backbone(name: str = "resnet50", weights: str | None = None, allow_missing: bool = False,
                    drop_path_rate: float = 0.0) -> tuple[nn.Module, LoadReport | None]:
    """A timm network without its classifier (``num_classes=0``: it returns pooled features).

    >>> net, _ = create_backbone("resnet18")
    >>> net.num_features
    512
    """
    check_backbone(name)
    kwargs = {"num_classes": 0, "drop_path_rate": drop_path_rate} if drop_path_rate else {"num_classes": 0}
    if weights == "timm":
        try:
            net = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub, network and cache errors alike
            raise WeightsError(f"timm pretrained weights for {name} could not be fetched ({type(e).__name__}: "
                               f"{e}). Without network access, download them elsewhere and pass the file path "
                               f"as the weights source.") from e
        log.info("%s: timm pretrained weights", name)
        return net, LoadReport("timm", loaded=len(net.state_dict()))
    try:
        net = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"backbone {name!r}: {e}") from e
    if weights in (None, "random", ""):
        log.info("%s: random initialisation", name)
        return net, None
    return net, load_backbone_weights(net, weights, allow_missing=allow_missing)
