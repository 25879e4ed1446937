"""AUDataModule: manifests -> MTCNN-aligned crop caches -> batches for AU training.

``prepare_data`` (one process per node) generates SynthAU when no manifests are given and
aligns every split into its cache; ``setup`` opens the caches (memory-mapped, shared by the
loader workers). Under a multi-process trainer the alignment moves to ``setup``, where every
rank takes its share of the images. Batches are dicts: ``image`` (B,3,S,S), ``labels`` (B,K) 0/1 floats, ``mask``
(B,K) True where labelled (``999`` is False: never a negative), and ``index``, the sample's
position in its split, which lets gathered predictions drop DistributedSampler's padding repeats.
When the training manifest has ``AU<n>_intensity`` columns (:attr:`AUDataModule.has_intensity`),
batches also carry ``intensity`` (B,K) float32 FACS levels 0-5 (0 where unknown) and
``intensity_mask`` (B,K), False where the file says ``999`` or the AU has no intensity column.
Images travel as uint8 and are normalised after the transfer to the device (4x less to copy).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.alignment.align import AlignmentSettings
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest, summarize
from datamodules.augmentation import IMAGENET_MEAN, IMAGENET_STD, AUAugmentation, Normalize
from datamodules.download.downloader import DownloadSettings, download_manifests, local_manifest_path
from datamodules.io.manifest import (EMOTIONET_AUS, MAX_LEVEL, Manifest, intensity_column_name, is_url, positive_rate,
                                     read_levels, read_manifest, read_rows)
from datamodules.alignment.ranks import Ranks
from datamodules.sampling import MultilabelBalancedSampler
from datamodules.synthau.generate import SynthAUSettings, generate_synthau

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test", "predict")


class AlignedFaceDataset(Dataset):
    """Samples of one aligned split, optionally augmented.

    ``intensity``: the split's FACS levels and their mask, (N, K) each and in the split's sample
    order (:func:`split_levels`); samples then carry ``intensity`` and ``intensity_mask`` too.
    """

    def __init__(self, split: AlignedSplit, transform: AUAugmentation | None = None,
                 intensity: tuple[np.ndarray, np.ndarray] | None = None):
        if intensity is not None and any(a.shape != split.labels.shape for a in intensity):
            raise ValueError(f"intensity arrays of shapes {[a.shape for a in intensity]} for a split of labels "
                             f"{split.labels.shape}")
        self.split, self.transform, self.intensity = split, transform, intensity

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        image = np.asarray(self.split.crops[i])  # reads from the shared memory map
        arrays = [self.split.labels[i], self.split.mask[i]]
        if self.intensity is not None:
            arrays += [self.intensity[0][i], self.intensity[1][i]]
        if self.transform is not None:
            image, *arrays = self.transform(image, *arrays)
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "labels": torch.as_tensor(arrays[0], dtype=torch.float32),
            "mask": torch.as_tensor(arrays[1], dtype=torch.bool),
            "index": i,
        }
        if self.intensity is not None:
            sample["intensity"] = torch.as_tensor(arrays[2], dtype=torch.float32)
            sample["intensity_mask"] = torch.as_tensor(arrays[3], dtype=torch.bool)
        return sample


def split_levels(manifest: Manifest, split: AlignedSplit,
                 levels: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's intensity levels and mask (``levels``, else read by
    :func:`~datamodules.io.manifest.read_levels`) of the split's samples, matched by manifest line:
    the cache leaves unreadable rows out, so position in the manifest is not position in the split.

    Raises ``ValueError`` for a sample whose line the manifest has no row on (a cache of another file).
    """
    levels, known = levels if levels is not None else read_levels(manifest)
    pos = np.searchsorted(manifest.lines, split.lines)  # lines grow down the file
    found = pos < len(manifest.lines)
    found[found] = manifest.lines[pos[found]] == split.lines[found]
    if not found.all():
        raise ValueError(f"{split.path}: sample {int(np.flatnonzero(~found)[0])} is of line "
                         f"{int(split.lines[~found][0])}, which is no row of {manifest.path}")
    return levels[pos], known[pos]


def freeze_inherited_heap(worker_id: int) -> None:
    """A loader worker's start: the objects it inherited from the training process are left out of
    garbage collection, whose bookkeeping would otherwise write to (and so copy) every page of
    them: about 120 MB per worker after its first full collection (``benchmarks/scale.py``)."""
    gc.freeze()


class AUDataModule(L.LightningDataModule):
    """AU data for training and evaluation.

    Args:
        train_manifest, val_manifest, test_manifest: EmotioNet-form manifests (TSV/CSV with a
            header). Leave all three unset to use SynthAU, generated into ``data_root``.
        predict_manifest: manifest for ``predict``; defaults to the test manifest.
        image_root: folder that relative image paths start from (default: each manifest's folder).
        aus: the AUs to model, in order (EmotioNet-2020's 23 by default; DISFA/BP4D lists work).
        data_root: where SynthAU is generated.
        synth: SynthAU's size and seed.
        cache_dir: where aligned crops are cached.
        alignment: face detection and crop settings.
        align_workers: image decoding threads while aligning (0: decode in turn with detection).
        download_dir: where the images of manifests that hold URLs (EmotioNet) are downloaded;
            their rows then read local paths, and rows whose image failed are dropped (counted).
        download: the downloader's concurrency, timeouts, retries and size limits.
        batch_size: per process (DDP multiplies it by the number of processes).
        num_workers: loader processes per training process.
        balanced_sampling: draw training samples with :class:`MultilabelBalancedSampler`.
        shard_sampler: the sampler takes this rank's share of each draw itself: for a Trainer
            with ``use_distributed_sampler=False`` (the CLI sets it from that option). Lightning
            otherwise shards any sampler itself, and sharding twice would drop samples.
        sampling_power: exponent of the inverse AU frequency in the sampling weights.
        num_samples: samples drawn per epoch when balancing (default: the training set size).
        augment: flip (with left/right AU swap) and jitter training images.
        augment_strength: scales the photometric and geometric jitter (0: flips only).
        flip_p: probability of the horizontal flip.
        seed: seed of the balanced draw (each epoch draws with seed + epoch).
        mean, std: normalisation applied on the device, after the transfer.
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        predict_manifest: str | None = None,
        image_root: str | None = None,
        aus: Sequence[int] = EMOTIONET_AUS,
        data_root: str = "data/synthau",
        synth: SynthAUSettings = SynthAUSettings(),
        cache_dir: str = "data/cache",
        alignment: AlignmentSettings = AlignmentSettings(),
        align_workers: int = 0,
        download_dir: str = "data/downloads",
        download: DownloadSettings = DownloadSettings(),
        batch_size: int = 64,
        num_workers: int = 2,
        balanced_sampling: bool = False,
        shard_sampler: bool = False,
        sampling_power: float = 1.0,
        num_samples: int | None = None,
        augment: bool = True,
        augment_strength: float = 1.0,
        flip_p: float = 0.5,
        seed: int = 0,
        pin_memory: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Data and caches live on a filesystem every node sees (alignment needs it): one process
        # of the job prepares them, not one per node racing on the same files.
        self.prepare_data_per_node = False
        # Under LightningCLI, hparams hold the config as given (mappings): keep the objects apart.
        self.synth = synth if isinstance(synth, SynthAUSettings) else SynthAUSettings(**dict(synth))
        self.download = download if isinstance(download, DownloadSettings) else DownloadSettings(**dict(download))
        self.alignment = AlignmentSettings.coerce(alignment)
        given = [m is not None for m in (train_manifest, val_manifest, test_manifest)]
        if any(given) and not all(given):
            raise ValueError("data: give train_manifest, val_manifest and test_manifest together, "
                             "or none of them to use SynthAU")
        self.aus = tuple(int(a) for a in aus)
        self.synthetic = not any(given)
        root = Path(data_root)
        self.manifest_paths = {
            "train": train_manifest or str(root / "train.tsv"),
            "val": val_manifest or str(root / "val.tsv"),
            "test": test_manifest or str(root / "test.tsv"),
        }
        self.manifest_paths["predict"] = predict_manifest or self.manifest_paths["test"]
        self.splits: dict[str, AlignedSplit] = {}
        self.reports: dict[str, dict] = {}
        self.normalize = Normalize(mean, std)
        self._url_manifests: dict[str, bool] = {}
        self._au_priors: list[float] | None = None
        self._level_counts: list[list[float]] | None = None  # with _au_priors (_training_label_facts)
        self._has_intensity: bool | None = None
        self.intensity_levels: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per split, with has_intensity

    # -- preparation ------------------------------------------------------------------------
    def manifest(self, stage: str) -> Manifest:
        path = self.manifest_paths[stage]
        if self._holds_urls(path):  # read the local copy that prepare_data's download wrote
            path = local_manifest_path(path, self.hparams.download_dir)
        return read_manifest(path, aus=self.aus, root=self.hparams.image_root)

    def _holds_urls(self, path: str) -> bool:
        if path not in self._url_manifests:
            refs = read_manifest(path, aus=self.aus).images
            self._url_manifests[path] = any(is_url(r) for r in refs)
        return self._url_manifests[path]

    def _ranks(self) -> Ranks:
        """The trainer's processes, which share out the alignment (one when there is no trainer)."""
        trainer = self.trainer
        return Ranks.current() if trainer is not None and trainer.world_size > 1 else Ranks()

    def _align(self, stage: str, manifest: Manifest | None = None) -> Path:
        ranks = self._ranks()
        return align_manifest(manifest or self.manifest(stage), self.hparams.cache_dir, self.alignment,
                              root=self.hparams.image_root, name=stage, workers=self.hparams.align_workers,
                              progress=ranks.rank == 0, ranks=ranks)

    def _generate(self) -> dict:
        """SynthAU in ``data_root`` (rendered once; later calls read its summary)."""
        return generate_synthau(self.hparams.data_root, self.synth)

    def prepare_data(self) -> None:
        """Generate SynthAU if it is the data and is missing (or download the images of manifests
        that hold URLs), then align each split once.

        Lightning runs this on one process per node, before ``setup`` on all of them; the caches
        it writes are what ``setup`` opens. With more than one process, the other ranks would only
        wait here: alignment is left to ``setup``, which shares the images out over all of them.
        """
        if self.synthetic:
            summary = self._generate()
            log.info("SynthAU in %s: %s, %d AUs under 5%% positive, %d over 20%%, %.1f%% unlabelled; "
                     "contact sheet %s", self.hparams.data_root, summary["counts"], summary["aus_under_5pct"],
                     summary["aus_over_20pct"], 100 * summary["unlabelled_share"],
                     Path(self.hparams.data_root) / "contact_sheet.png")
        stages = ["train", "val", "test"]
        if self.manifest_paths["predict"] not in [self.manifest_paths[s] for s in stages]:
            stages.append("predict")
        remote = sorted({self.manifest_paths[s] for s in stages if self._holds_urls(self.manifest_paths[s])})
        if remote:
            report = download_manifests(remote, self.hparams.download_dir, self.download, aus=self.aus)
            log.info(report.summary())
        if self._ranks().distributed:
            return
        for stage in stages:
            manifest = self.manifest(stage)
            if self.has_intensity:
                read_levels(manifest)  # a malformed level stops the run before the long alignment
            self.reports[stage] = AlignedSplit.open(self._align(stage, manifest)).report
            log.info(summarize(self.reports[stage]))

    def setup(self, stage: str | None = None) -> None:
        """Open the caches the stage needs (``fit``: train and val), aligning what is missing (on
        every rank together, in a multi-process run)."""
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for s in wanted.get(stage, ["train", "val", "test"]) if stage else ["train", "val", "test"]:
            if s not in self.splits:
                manifest = self.manifest(s)
                levels = read_levels(manifest) if self.has_intensity else None  # checked before aligning
                self.splits[s] = AlignedSplit.open(self._align(s, manifest))
                self.reports[s] = self.splits[s].report
                if levels is not None:
                    self._note_missing_levels(s, manifest)
                    self.intensity_levels[s] = split_levels(manifest, self.splits[s], levels)

    def _note_missing_levels(self, stage: str, manifest: Manifest) -> None:
        missing = [a for a in self.aus if intensity_column_name(a) not in manifest.extra]
        if missing:
            log.info("%s (%s): no intensity column for AU %s: their intensities are masked out", manifest.path,
                     stage, ", ".join(map(str, missing)))

    # -- loaders ----------------------------------------------------------------------------
    def dataset(self, stage: str) -> AlignedFaceDataset:
        augment = stage == "train" and self.hparams.augment
        return AlignedFaceDataset(self.splits[stage],
                                  AUAugmentation(self.aus, self.hparams.flip_p, self.hparams.augment_strength)
                                  if augment else None, intensity=self.intensity_levels.get(stage))

    def train_sampler(self) -> MultilabelBalancedSampler | None:
        if not self.hparams.balanced_sampling:
            return None
        split = self.splits["train"]
        shard = {}
        trainer = self.trainer
        if self.hparams.shard_sampler and trainer is not None and trainer.world_size > 1:
            shard = {"num_replicas": trainer.world_size, "rank": trainer.global_rank}
        return MultilabelBalancedSampler(split.labels, split.mask, num_samples=self.hparams.num_samples,
                                         seed=self.hparams.seed, power=self.hparams.sampling_power, **shard)

    def _loader(self, stage: str, sampler=None, shuffle: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.dataset(stage), batch_size=self.hparams.batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=freeze_inherited_heap if workers else None,
                          pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                          drop_last=stage == "train" and len(self.splits[stage]) > self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", sampler=self.train_sampler(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 -> normalised float on the device, where it is cheap."""
        batch["image"] = self.normalize(batch["image"])
        return batch

    # -- facts other parts use ---------------------------------------------------------------
    @property
    def au_priors(self) -> list[float]:
        """Per AU, the positive share among the labelled entries of the training manifest (nan
        where none is labelled): the prior selective learning aims at with ``target_rate: prior``.

        Read from the manifest's labels (so before any image is downloaded or aligned; SynthAU is
        generated first if it is the data). The CLI links it to ``model.au_priors``.
        """
        return self._training_label_facts()[0]

    def _training_label_facts(self) -> tuple[list[float], list[list[float]] | None]:
        """``au_priors`` and ``intensity_level_counts`` from one reading of the training manifest
        (the CLI asks for both at instantiation; a manifest of a million rows takes seconds)."""
        if self._au_priors is None:
            if self.synthetic:
                self._generate()
            manifest = read_manifest(self.manifest_paths["train"], aus=self.aus, root=self.hparams.image_root)
            self._au_priors = [float(r) for r in manifest.positive_rate()]
            if self.has_intensity:
                levels, known = read_levels(manifest, self.aus)
                self._level_counts = [[float(((levels[:, k] == level) & known[:, k]).sum())
                                       for level in range(1, MAX_LEVEL + 1)] for k in range(len(self.aus))]
        return self._au_priors, self._level_counts

    @property
    def has_intensity(self) -> bool:
        """Whether batches carry ``intensity`` and ``intensity_mask``: the training manifest has an
        ``AU<n>_intensity`` column for at least one AU of ``aus``. The AUs without one (in any
        split's manifest) are masked out, and logged when the split is set up.

        Read from the training manifest's header (SynthAU is generated first if it is the data);
        where that file is absent (a run that only tests), from the first of val and test present.
        """
        if self._has_intensity is None:
            if self.synthetic:
                self._generate()
            paths = [self.manifest_paths[s] for s in ("train", "val", "test")]
            first = next(read_rows(next((p for p in paths if Path(p).is_file()), paths[0])), None)
            names = {h.strip() for h in first[1]} if first is not None else set()
            self._has_intensity = any(intensity_column_name(a) in names for a in self.aus)
        return self._has_intensity

    @property
    def intensity_level_counts(self) -> list[list[float]] | None:
        """Per AU, the training manifest's labelled frames at FACS levels 1-5 (None without
        intensities): what weights rare high levels in the intensity loss. The CLI links it to
        ``model.intensity_level_counts``."""
        return self._training_label_facts()[1]

    def label_frequencies(self, stage: str = "train") -> np.ndarray:
        """Per-AU positive rate over labelled entries of a split (nan where none is labelled)."""
        return positive_rate(self.splits[stage].labels, self.splits[stage].mask)
