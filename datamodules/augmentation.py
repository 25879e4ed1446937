"""Training augmentation for aligned face crops, with AU-aware horizontal flips.

A mirrored face is a valid face, but not with the same labels: a head turned left becomes a
head turned right. The flip therefore swaps the labels (and masks, and any other per-AU arrays
such as intensities) of left/right AU pairs.
Photometric and small geometric changes come from albumentations; rotations stay small because
the alignment has already removed the head's roll.
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import numpy as np
import torch

# timm's ResNets were trained on ImageNet statistics; the project normalises with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Left/right AU pairs that a horizontal flip exchanges: head turn (51/52) and tilt (55/56).
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((51, 52), (55, 56))


def flip_permutation(aus: Sequence[int], pairs: Sequence[tuple[int, int]] = FLIP_PAIRS) -> np.ndarray:
    """Column order of the labels after a horizontal flip.

    >>> flip_permutation([12, 51, 52, 55]).tolist()  # 56 absent: 55 stays
    [0, 2, 1, 3]
    """
    aus = list(aus)
    perm = np.arange(len(aus))
    for a, b in pairs:
        if a in aus and b in aus:
            i, j = aus.index(a), aus.index(b)
            perm[i], perm[j] = j, i
    return perm


class AUAugmentation:
    """Random AU-aware flip, then albumentations' photometric and geometric jitter.

    Called with an HWC uint8 image, labels and mask (per AU), and optionally more per-AU arrays
    (intensity levels and their mask); returns them all, transformed, in the same order.
    Randomness comes from numpy's global generator, which Lightning seeds per worker
    (``seed_everything(workers=True)``), so runs are reproducible.
    """

    def __init__(self, aus: Sequence[int], flip_p: float = 0.5, strength: float = 1.0):
        self.flip_p = flip_p
        self.perm = flip_permutation(aus)
        s = strength
        self.transform = A.Compose([
            A.Affine(scale=(1 - 0.08 * s, 1 + 0.08 * s), translate_percent=(-0.05 * s, 0.05 * s),
                     rotate=(-5 * s, 5 * s), border_mode=1, p=0.8),
            A.ColorJitter(brightness=0.3 * s, contrast=0.3 * s, saturation=0.3 * s, hue=0.03 * s, p=0.8),
            A.OneOf([A.GaussianBlur(sigma_limit=(0.3, 1.2)), A.Downscale(scale_range=(0.4, 0.8)),
                     A.ImageCompression(quality_range=(30, 90))], p=0.3 * s),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.2 * s),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3),
                            fill="random_uniform", p=0.2 * s),
        ])

    def flip(self, image: np.ndarray, labels: np.ndarray, mask: np.ndarray,
             *per_au: np.ndarray) -> tuple[np.ndarray, ...]:
        """The deterministic part: mirror the image, swap the left/right AU columns of every array."""
        return (np.ascontiguousarray(image[:, ::-1]), labels[..., self.perm], mask[..., self.perm],
                *(a[..., self.perm] for a in per_au))

    def __call__(self, image: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                 *per_au: np.ndarray) -> tuple[np.ndarray, ...]:
        arrays = (labels, mask, *per_au)
        if np.random.random() < self.flip_p:
            image, *arrays = self.flip(image, *arrays)
        return (self.transform(image=image)["image"], *arrays)


class Normalize:
    """uint8 images -> ``(x / 255 - mean) / std`` floats, on whatever device they arrive.

    Loaders ship uint8 (4x less to copy) and the DataModules call this after the transfer, where
    it is cheap. Float input passes through unchanged.

    >>> Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten()
    tensor([1., 1., 1.])
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            return image
        if self._cache is None or self._cache[0].device != image.device:
            self._cache = (torch.tensor(self.mean, device=image.device).view(1, 3, 1, 1) * 255,
                           torch.tensor(self.std, device=image.device).view(1, 3, 1, 1) * 255)
        mean, std = self._cache
        return (image.float() - mean) / std
