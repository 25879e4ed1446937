"""PretrainDataModule: aligned faces with one class label each, for the pretraining stage.

Two tasks, two label kinds: ``identity`` (face recognition, ArcFace) and ``expression``
(neutral and the basic emotions). Two kinds of source, exactly one per data module:

* a **manifest** with the class column: SynthAU's ``train.tsv`` carries ``identity`` and
  ``expression`` next to its AU columns (the default when no source is given:
  ``<data_root>/train.tsv``). A manifest without EmotioNet's AU columns (e.g. a list of
  VGGFace2 images and their identities) works too: see below.
* an **image folder** tree ``root/<class>/<image>``, as VGGFace2, CASIA-WebFace, RAF-DB and
  AffectNet come.

Either way the images go through the same MTCNN alignment and crop cache as the AU data
(:func:`align_manifest`). That cache is keyed by a manifest in EmotioNet form, so for an image
folder (or a manifest without the AU columns) the module writes a derived manifest into
``cache_dir``: ``image`` (absolute path), one dummy AU column (``AU1``, every value ``999``:
unlabelled, never used) and the class column, read back with ``read_manifest(..., aus=(1,))``.
A SynthAU manifest is read with the EmotioNet AUs as is, so its cache is the very one the AU
training aligned (same key): nothing is aligned twice.

Labels: class names -> contiguous integers in sorted order (numerically when every name is an
integer, as SynthAU's identities are). Splits:

* ``identity``: whole identities are held out for validation (``val_fraction`` of them,
  seeded), so verification runs on people the network never saw. Held-out identities are drawn
  first among those with at least two images (a verification pair needs two). Training
  identities get labels ``0..num_classes-1`` (the ArcFace head's classes), held-out ones the
  labels after them; ``classes`` lists the names in label order.
* ``expression``: a seeded random split of the samples, class by class (stratified), every
  class with two or more samples keeping at least one for validation.

Batches: ``{"image": uint8 (B,3,S,S), "label": long (B,), "index": long (B,)}``; ``index`` is
the sample's position in its split (gathered validation outputs drop DistributedSampler's
padding repeats with it). Images are normalised with ImageNet's mean and std after the
transfer to the device.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.alignment.align import AlignmentSettings
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
from datamodules.augmentation import IMAGENET_MEAN, IMAGENET_STD, Normalize
from datamodules.io.images import IMAGE_SUFFIXES
from datamodules.io.manifest import (EMOTIONET_AUS, UNLABELLED, Manifest, ManifestError, au_column_name, read_columns,
                                  read_manifest, write_manifest)

log = logging.getLogger(__name__)

TASKS = ("identity", "expression")
DUMMY_AUS = (1,)  # the derived manifests' one AU column, all 999


def class_sort_key(name: str):
    """Sort key of class names: numeric when the name is an integer.

    >>> sorted(["10", "2", "1"], key=class_sort_key)
    ['1', '2', '10']
    >>> sorted(["sadness", "anger", "12"], key=class_sort_key)
    ['12', 'anger', 'sadness']
    """
    s = name.strip()
    try:
        return (0, int(s), "")
    except ValueError:
        return (1, 0, s)


def image_folder_items(root: str | Path) -> list[tuple[str, str]]:
    """``(absolute image path, class name)`` for every image under ``root/<class>/``, sorted.

    Images deeper in a class folder belong to that class (VGGFace2's test lists, for example,
    keep a flat tree; some copies nest one more level).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    items = []
    for class_dir in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                            key=lambda p: class_sort_key(p.name)):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."):
                    items.append((os.path.abspath(os.path.join(dirpath, f)), class_dir.name))
    if not items:
        raise ValueError(f"image folder {root} holds no images in class folders (expected root/<class>/<image>, "
                         f"image suffixes {', '.join(IMAGE_SUFFIXES)})")
    return items


def write_derived_manifest(path: Path, items: Sequence[tuple[str, str]], column: str) -> Path:
    """A manifest in EmotioNet form for images that have no AU labels: ``image``, ``AU1`` (all
    ``999``) and the class column; rewritten only when its content changes (so its alignment
    cache stays valid)."""
    return write_manifest(path, ["image", au_column_name(DUMMY_AUS[0]), column],
                          ((image, UNLABELLED, label) for image, label in items), only_if_changed=True)


class PretrainAugmentation:
    """Horizontal flip and mild photometric and geometric jitter (identity and expression are
    both invariant to a mirror). Randomness from numpy's global generator, which Lightning
    seeds per worker."""

    def __init__(self, flip_p: float = 0.5, strength: float = 1.0):
        self.flip_p = flip_p
        s = strength
        self.transform = A.Compose([
            A.Affine(scale=(1 - 0.05 * s, 1 + 0.05 * s), translate_percent=(-0.03 * s, 0.03 * s),
                     rotate=(-5 * s, 5 * s), border_mode=1, p=0.5),
            A.ColorJitter(brightness=0.2 * s, contrast=0.2 * s, saturation=0.2 * s, hue=0.02 * s, p=0.5),
        ])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if np.random.random() < self.flip_p:
            image = np.ascontiguousarray(image[:, ::-1])
        return self.transform(image=image)["image"]


class LabelledFaceDataset(Dataset):
    """Some samples of an aligned split, each with a class label."""

    def __init__(self, split: AlignedSplit, rows: np.ndarray, labels: np.ndarray,
                 transform: PretrainAugmentation | None = None):
        self.split, self.rows, self.labels, self.transform = split, rows, labels, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        image = np.asarray(self.split.crops[self.rows[i]])  # from the shared memory map
        if self.transform is not None:
            image = self.transform(image)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": int(self.labels[i]), "index": i}


class PretrainDataModule(L.LightningDataModule):
    """Aligned faces labelled with an identity or an expression, for the pretraining stage.

    Args:
        task: ``identity`` (face recognition) or ``expression``.
        manifest: a manifest (TSV/CSV with a header) holding the image and the class column.
        image_folder: a tree ``root/<class>/<image>`` instead of a manifest.
        column: the manifest's class column (default: the task's name). For an image folder it
            only names the derived manifest's column.
        image_column: the manifest's image column (default: the first).
        image_root: folder that the manifest's relative image paths start from (default: the
            manifest's folder).
        classes: expression only: the class names in label order (e.g. SynthAU's 8), so that
            labels match across data sets even when a class is missing from one; samples of
            other classes are an error. Default: the sorted names found.
        val_fraction: share of identities (``identity``) or samples (``expression``) held out.
        data_root: where SynthAU was generated; ``<data_root>/train.tsv`` is the manifest when
            neither ``manifest`` nor ``image_folder`` is given.
        cache_dir: where aligned crops (and derived manifests) are cached.
        alignment: face detection and crop settings (as for the AU data).
        align_workers: image decoding threads while aligning (0: decode in turn with detection).
        batch_size, num_workers: per process.
        seed: seed of the split.
        augment: flip and jitter training images.
        augment_strength: scales the jitter (0: flips only).
        pin_memory: pin batches when a GPU is there.
        mean, std: normalisation applied on the device.
    """

    def __init__(
        self,
        task: str = "identity",
        manifest: str | None = None,
        image_folder: str | None = None,
        column: str | None = None,
        image_column: str | None = None,
        image_root: str | None = None,
        classes: list[str] | None = None,
        val_fraction: float = 0.1,
        data_root: str = "data/synthau",
        cache_dir: str = "data/cache",
        alignment: AlignmentSettings = AlignmentSettings(),
        align_workers: int = 0,
        batch_size: int = 64,
        num_workers: int = 2,
        seed: int = 0,
        augment: bool = True,
        augment_strength: float = 1.0,
        pin_memory: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.save_hyperparameters()
        if task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {task!r}")
        if manifest is not None and image_folder is not None:
            raise ValueError("data: give a manifest or an image_folder, not both")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if classes is not None and task != "expression":
            raise ValueError("data.classes fixes the expression classes; identities come from the data")
        self.alignment = AlignmentSettings.coerce(alignment)
        self.task = task
        self.column = column or task
        self.manifest_path = None if image_folder is not None else (manifest or str(Path(data_root) / "train.tsv"))
        self.classes: list[str] = []
        self.class_counts: dict[str, int] = {}
        self.split: AlignedSplit | None = None
        self.datasets: dict[str, LabelledFaceDataset] = {}
        self.report: dict = {}
        self._num_classes: int | None = None
        self.normalize = Normalize(mean, std)

    # -- the source -------------------------------------------------------------------------
    def manifest(self) -> tuple[Manifest, str]:
        """The manifest to align (the given one, or a derived one) and the cache name."""
        hp = self.hparams
        if hp.image_folder is not None:
            items = image_folder_items(hp.image_folder)
            tag = hashlib.sha256(os.path.abspath(hp.image_folder).encode()).hexdigest()[:8]
            name = f"imagefolder-{Path(hp.image_folder).name}-{tag}"
            path = write_derived_manifest(Path(hp.cache_dir) / f"{name}.tsv", items, self.column)
            return read_manifest(path, aus=DUMMY_AUS), name
        path = Path(self.manifest_path)
        if not path.is_file():
            hint = (" (SynthAU has not been generated there: run the AU training once, or "
                    "datamodules.synthau.generate.generate_synthau, or pass data.manifest / data.image_folder)"
                    if hp.manifest is None else "")
            raise FileNotFoundError(f"pretraining manifest {path} not found{hint}")
        try:  # EmotioNet form (SynthAU): the AU data's own cache serves
            manifest = read_manifest(path, aus=EMOTIONET_AUS, root=hp.image_root, image_column=hp.image_column)
        except ManifestError as e:
            if "missing AU column" not in str(e):
                raise
            manifest = None
        if manifest is not None:
            if self.column not in manifest.extra:
                raise ValueError(f"manifest {path} has no {self.column!r} column (columns besides the image and "
                                 f"the AUs: {sorted(manifest.extra)}); set data.column")
            return manifest, path.stem
        # No AU columns: derive a manifest with a dummy one.
        items = self._read_plain_manifest(path)
        key = hashlib.sha256(f"{path.resolve()}\0{self.column}\0{hp.image_root}".encode()).hexdigest()[:8]
        name = f"{path.stem}-{self.column}-{key}"
        derived = write_derived_manifest(Path(hp.cache_dir) / f"{name}.tsv", items, self.column)
        return read_manifest(derived, aus=DUMMY_AUS), name

    def _read_plain_manifest(self, path: Path) -> list[tuple[str, str]]:
        """(absolute image path, class) of a manifest without AU columns."""
        hp = self.hparams
        rows = read_columns(path, [self.column], hp.image_column, hp.image_root)
        return [(image, label) for _, image, (label,) in rows]

    def _align(self) -> tuple[Manifest, Path]:
        manifest, name = self.manifest()
        root = None if self.hparams.image_folder is not None else self.hparams.image_root
        path = align_manifest(manifest, self.hparams.cache_dir, self.alignment, root=root, name=name,
                              workers=self.hparams.align_workers, progress=True)
        return manifest, path

    def prepare_data(self) -> None:
        """Align the source once (one process per node); ``setup`` opens the cache."""
        self._align()

    # -- labels and split -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open the cache, label the samples and split them (once; later calls are no-ops)."""
        if self.split is not None:
            return
        manifest, path = self._align()
        split = AlignedSplit.open(path)
        row_of_line = {int(line): i for i, line in enumerate(manifest.lines)}
        names = np.array([manifest.extra[self.column][row_of_line[int(line)]] for line in split.lines], dtype=object)
        rows = np.arange(len(split))
        labelled = np.array([bool(str(n).strip()) for n in names], dtype=bool)
        if not labelled.all():
            log.warning("%d of %d samples have no %s label and are left out", int((~labelled).sum()), len(names),
                        self.column)
            rows, names = rows[labelled], names[labelled]
        names = np.array([str(n).strip() for n in names], dtype=object)
        if len(rows) == 0:
            raise ValueError(f"no labelled sample for {self.column!r} in {manifest.path}")
        rng = np.random.default_rng(self.hparams.seed)
        if self.task == "identity":
            train_rows, train_lab, val_rows, val_lab = self._identity_split(rows, names, rng)
        else:
            train_rows, train_lab, val_rows, val_lab = self._expression_split(rows, names, rng)
        self.split = split
        transform = PretrainAugmentation(strength=self.hparams.augment_strength) if self.hparams.augment else None
        self.datasets = {"train": LabelledFaceDataset(split, train_rows, train_lab, transform),
                         "val": LabelledFaceDataset(split, val_rows, val_lab)}
        self.report = {"samples": len(rows), "train": len(train_rows), "val": len(val_rows),
                       "num_classes": self._num_classes, "classes": len(self.classes),
                       "no_face": int((~split.face_found).sum()), "unreadable": split.report.get("unreadable", 0)}
        log.info("pretraining data (%s): %s", self.task, self.report)

    def _identity_split(self, rows: np.ndarray, names: np.ndarray, rng: np.random.Generator):
        ids, counts = np.unique(names, return_counts=True)
        if len(ids) < 4:
            raise ValueError(f"the identity task needs at least 4 identities (2 to train, 2 to verify), "
                             f"found {len(ids)}")
        n_val = min(max(2, round(self.hparams.val_fraction * len(ids))), len(ids) - 2)
        # Verification needs two images of an identity: draw those first.
        multi, single = ids[counts >= 2], ids[counts < 2]
        order = np.concatenate([rng.permutation(multi), rng.permutation(single)])
        val_ids = sorted(order[:n_val].tolist(), key=class_sort_key)
        train_ids = sorted(set(ids.tolist()) - set(val_ids), key=class_sort_key)
        self.classes = train_ids + val_ids
        self.train_classes, self.val_classes = train_ids, val_ids
        self._num_classes = len(train_ids)
        self.class_counts = dict(zip(ids.tolist(), counts.tolist()))
        label_of = {n: i for i, n in enumerate(self.classes)}
        labels = np.array([label_of[n] for n in names], dtype=np.int64)
        is_val = labels >= len(train_ids)
        return rows[~is_val], labels[~is_val], rows[is_val], labels[is_val]

    def _expression_split(self, rows: np.ndarray, names: np.ndarray, rng: np.random.Generator):
        found = sorted(set(names.tolist()), key=class_sort_key)
        if self.hparams.classes is not None:
            self.classes = [str(c) for c in self.hparams.classes]
            unknown = sorted(set(found) - set(self.classes))
            if unknown:
                raise ValueError(f"expression labels {unknown} are not in data.classes {self.classes}")
        else:
            self.classes = found
        self.train_classes = self.val_classes = self.classes
        self._num_classes = len(self.classes)
        label_of = {n: i for i, n in enumerate(self.classes)}
        labels = np.array([label_of[n] for n in names], dtype=np.int64)
        self.class_counts = {c: int((labels == i).sum()) for i, c in enumerate(self.classes)}
        is_val = np.zeros(len(rows), dtype=bool)
        for c in range(len(self.classes)):
            members = np.flatnonzero(labels == c)
            if len(members) < 2:
                continue
            n_val = min(max(1, round(self.hparams.val_fraction * len(members))), len(members) - 1)
            is_val[rng.permutation(members)[:n_val]] = True
        return rows[~is_val], labels[~is_val], rows[is_val], labels[is_val]

    @property
    def num_classes(self) -> int:
        """Classes the classifier learns: training identities (``identity``) or expressions."""
        if self._num_classes is None:
            self.setup()
        return self._num_classes  # type: ignore[return-value]

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[stage]
        workers = self.hparams.num_workers
        # Whole batches only in training (BatchNorm cannot take a batch of one).
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0,
                          pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                          drop_last=stage == "train" and len(dataset) >= self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 -> normalised float on the device, where it is cheap."""
        batch["image"] = self.normalize(batch["image"])
        return batch
