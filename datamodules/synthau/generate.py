"""SynthAU: a procedurally rendered AU data set, generated deterministically from a seed.

No AU data set may be shipped, so the project renders its own. The label model
(``synthetic_labels``) draws each face's expression and AUs, the renderer (``synthetic_face``)
moves the face's geometry with them, and each scene (``synthetic_scene``) puts the face in a
larger picture with the challenges of the wild: pose, illumination, resolution and occlusion.
This module writes the data set to disk.

The output is exactly the EmotioNet form (tab-separated manifests, image reference first, then
the AU columns with 0/1/999), plus identity and expression columns for the pretraining tasks, an
``AU<n>_intensity`` column per AU (the FACS level 0-5 of the intensity drawn, 999 where the AU is
unlabelled) and the ground-truth boxes and landmarks of every face drawn (``faces.jsonl``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from datamodules.io import files
from datamodules.io.manifest import (EMOTIONET_AUS, UNLABELLED, au_column_name, intensity_column_name, positive_rate,
                                     write_manifest)
from datamodules.synthau.face import FaceSpec, Identity, render_face, sample_identity
from datamodules.synthau.labels import sample_labels
from datamodules.synthau.layouts import facs_level
from datamodules.synthau.scene import render_scene

# Part of the settings, so a folder written by another version is generated again. 2: the
# manifests gained the intensity columns (images unchanged).
SYNTHAU_VERSION = 2
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SynthAUSettings:
    """Everything the generated files depend on; a change regenerates them."""

    num_images: int = 2000
    seed: int = 0
    num_identities: int = 120
    width: int = 640
    height: int = 480
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    version: int = SYNTHAU_VERSION


def _identities(settings: SynthAUSettings) -> list[Identity]:
    return [sample_identity(np.random.default_rng([settings.seed, 1_000_000 + i])) for i in range(settings.num_identities)]


def _render_chunk(args: tuple[SynthAUSettings, list[tuple[int, str]], str]) -> list[dict]:
    settings, items, out_dir = args
    identities = _identities(settings)
    rows = []
    for index, split in items:
        rng = np.random.default_rng([settings.seed, index])
        scene, meta = render_scene(rng, identities, (settings.width, settings.height))
        name = f"images/{split}/{index:06d}.jpg"
        quality = int(rng.uniform(40, 96))  # compression is part of the resolution challenge
        if not cv2.imwrite(os.path.join(out_dir, name), scene[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"could not write {os.path.join(out_dir, name)}")
        meta.update(index=index, split=split, image=name, jpeg_quality=quality,
                    labels=sample_labels(rng, {int(k): v for k, v in meta["intensity"].items()}, EMOTIONET_AUS))
        rows.append(meta)
    return rows


def _split_of(settings: SynthAUSettings) -> list[str]:
    n = settings.num_images
    order = np.random.default_rng([settings.seed, 7]).permutation(n)
    n_val = int(round(n * settings.val_fraction))
    n_test = int(round(n * settings.test_fraction))
    split = ["train"] * n
    for i in order[:n_val]:
        split[i] = "val"
    for i in order[n_val:n_val + n_test]:
        split[i] = "test"
    return split


def intensity_levels(row: dict) -> list[int]:
    """A scene's FACS levels (0-5) per EmotioNet AU, as its manifest row writes them: ``999`` where
    the occurrence label is, at least level A (1) where it is 1, 0 where it is 0.

    The level is that of the intensity drawn for the labelled face (:func:`facs_level`, as the
    benchmark layouts write it); a present AU drawn under level A would still be one the
    occurrence label calls present, hence the floor of 1.
    """
    drawn = {int(au): v for au, v in row["intensity"].items()}
    out = []
    for au, label in zip(EMOTIONET_AUS, row["labels"]):
        if label == UNLABELLED:
            out.append(UNLABELLED)
        elif label == 1:
            out.append(max(1, facs_level(drawn.get(au, 0.0))))
        else:
            out.append(0)
    return out


def _write_split(path: Path, rows: list[dict]) -> None:
    """A split's manifest in EmotioNet form: image, one column per AU, identity and expression, then
    one intensity column per AU (appended, so the earlier columns keep their places)."""
    header = (["image"] + [au_column_name(a) for a in EMOTIONET_AUS] + ["identity", "expression"]
              + [intensity_column_name(a) for a in EMOTIONET_AUS])
    write_manifest(path, header, ([r["image"], *r["labels"], r["identity"], r["expression"], *intensity_levels(r)]
                                  for r in rows))


def label_statistics(rows: list[dict]) -> dict:
    """Per-AU positive rate over labelled entries and the share of ``999`` labels."""
    y = np.array([r["labels"] for r in rows])
    labelled = y != UNLABELLED
    pos = positive_rate(y == 1, labelled)
    return {
        "positive_rate": {au_column_name(a): round(float(p), 4) for a, p in zip(EMOTIONET_AUS, pos)},
        "unlabelled_share": round(float(1 - labelled.mean()), 4),
        "aus_under_5pct": int((pos < 0.05).sum()),
        "aus_over_20pct": int((pos > 0.2).sum()),
    }


def contact_sheet(root: Path, rows: list[dict], path: Path, cols: int = 6, n: int = 24, thumb: int = 240) -> None:
    """A grid of scenes, each captioned with its positive AUs (``?`` counts unlabelled AUs)."""
    tiles = []
    for r in rows[:n]:
        img = cv2.imread(str(root / r["image"]))
        h = int(thumb * img.shape[0] / img.shape[1])
        img = cv2.resize(img, (thumb, h), interpolation=cv2.INTER_AREA)
        for f in r["faces"]:  # the ground-truth box of the labelled face
            if f["primary"]:
                b = np.array(f["box"]) * thumb / r.get("width", 640)
                cv2.rectangle(img, (int(b[0]), int(b[1])), (int(b[2]), int(b[3])), (0, 255, 0), 1)
        caption = np.full((44, thumb, 3), 255, np.uint8)
        pos = [str(a) for a, v in zip(EMOTIONET_AUS, r["labels"]) if v == 1]
        unl = sum(v == UNLABELLED for v in r["labels"])
        cv2.putText(caption, f"{r['expression']}  ?x{unl}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(caption, "AU " + ",".join(pos) if pos else "no AU", (4, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (0, 0, 160), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([img, caption], 0))
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.concatenate([np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles), cols)], 0)
    cv2.imwrite(str(path), grid)


def au_gallery(path: Path, seed: int = 0) -> None:
    """One identity, frontal, each AU alone at full intensity: what the renderer does per AU."""
    ident = sample_identity(np.random.default_rng([seed, 1_000_000]))
    light = np.array([0.3, -0.3, 0.9]) / np.linalg.norm([0.3, -0.3, 0.9])
    tiles = []
    for au in (0,) + EMOTIONET_AUS:
        face, alpha, _ = render_face(FaceSpec(ident, {au: 1.0} if au else {}), 192, light, 0.45,
                                     np.random.default_rng(0))
        tile = (face * alpha[..., None] + 235 * (1 - alpha[..., None])).astype(np.uint8)
        cv2.putText(tile, au_column_name(au) if au else "neutral", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    grid = np.concatenate([np.concatenate(tiles[i:i + 8], 1) for i in range(0, 24, 8)], 0)
    cv2.imwrite(str(path), grid[..., ::-1])


def synthau_is_complete(root: Path, settings: SynthAUSettings) -> bool:
    marker = Path(root) / "synthau.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["settings"] == asdict(settings)
    except (ValueError, KeyError):
        return False


def generate_synthau(root: str | Path, settings: SynthAUSettings = SynthAUSettings(), workers: int | None = None,
                     force: bool = False) -> dict:
    """Render SynthAU into ``root`` (``images/``, ``{train,val,test}.tsv``, ``faces.jsonl``, sheets).

    Deterministic: the same settings give the same files whatever the number of workers, since
    every image draws from its own generator seeded by (seed, index). The files are written to a
    temporary folder that replaces ``root`` only once complete, so an interrupted run never leaves
    a data set that looks finished. ``synthau.json`` is written last and marks completion.
    Returns the summary stored in ``synthau.json``.
    """
    root = Path(root)
    if not force and synthau_is_complete(root, settings):
        return json.loads((root / "synthau.json").read_text())
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
        split_of = _split_of(settings)
        items = list(enumerate(split_of))
        workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        chunks = [items[i::max(1, workers * 4)] for i in range(max(1, workers * 4))]
        jobs = [(settings, c, str(tmp)) for c in chunks if c]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                rows = [r for part in pool.map(_render_chunk, jobs) for r in part]
        else:
            rows = [r for job in jobs for r in _render_chunk(job)]
        rows.sort(key=lambda r: r["index"])
        for r in rows:
            r["width"], r["height"] = settings.width, settings.height
        for split in SPLITS:
            _write_split(tmp / f"{split}.tsv", [r for r in rows if r["split"] == split])
        with open(tmp / "faces.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        contact_sheet(tmp, [r for r in rows if r["split"] == "train"], tmp / "contact_sheet.png")
        au_gallery(tmp / "au_gallery.png", settings.seed)
        summary = {
            "settings": asdict(settings),
            "counts": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
            "identities": len({r["identity"] for r in rows}),
            "expressions": sorted({r["expression"] for r in rows}),
            "occluded": sum(r["occlusion"] is not None for r in rows),
            "low_res": sum(r["low_res"] for r in rows),
            "multi_face": sum(len(r["faces"]) > 1 for r in rows),
            **label_statistics(rows),
        }
        (tmp / "synthau.json").write_text(json.dumps(summary, indent=2))
        files.replace_folder(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary
