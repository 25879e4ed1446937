"""People and AU signals in video, against SynthAU's ground truth: ``au-detect predict`` on
SynthAU clips (people crossing, leaving and coming back: ``au-detect synth --video``), its
``person`` ids scored with IDF1 and identity switches (the MOT measures), and per-frame AU F1 of
the raw decisions against the smoothed ones (same model, same run).

    python benchmarks/video_people.py --model runs/demo/.../best.ckpt [--root data/synthau_video]

Truth faces are those at least 60 % inside the frame and at most half hidden by a nearer face;
a predicted face on a face outside that set (cut by the edge, mostly hidden) is neither right nor
wrong and is left out, as the MOT benchmarks do with their ignore regions.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthau.video import VideoSettings, clip_names, read_truth, render_videos  # noqa: E402
from lightning_modules.serving.people import box_iou, identity_scores  # noqa: E402

MIN_IOU = 0.5
MAX_OCCLUDED = 0.5


def _counted(face: dict) -> bool:
    return bool(face["visible"]) and face.get("occluded", 0.0) <= MAX_OCCLUDED


def match_frame(truth_faces: list[dict], rows: list[dict]) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """A frame's predicted rows matched one to one to its truth faces (IoU >= 0.5, optimal
    assignment over all listed faces); returns the matched pairs with a counted truth face, and
    the predicted rows left to count (unmatched, or matched to a counted face)."""
    if not truth_faces or not rows:
        return [], list(rows)
    iou = box_iou(np.array([f["box"] for f in truth_faces]), np.array([[float(r[k]) for k in ("x0", "y0", "x1", "y1")]
                                                                       for r in rows]))
    cost = np.where(iou >= MIN_IOU, 1 - iou, 1e6)
    pairs, ignored = [], set()
    for i, j in zip(*linear_sum_assignment(cost)):
        if cost[i, j] < 1e6:
            if _counted(truth_faces[i]):
                pairs.append((truth_faces[i], rows[j]))
            else:
                ignored.add(j)
    return pairs, [r for j, r in enumerate(rows) if j not in ignored]


def score_clip(truth: list[dict], rows: list[dict], aus: list[str]) -> dict:
    """IDF1 and switches of the ``person`` column, and per AU the counts of raw and smoothed
    decisions against the truth labels, over one clip."""
    by_frame: dict[int, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            by_frame.setdefault(int(r["frame"]), []).append(r)
    gt_frames, pr_frames = [], []
    counts = {kind: np.zeros((len(aus), 3)) for kind in ("raw", "smooth")}  # tp, fp, fn
    for line in truth:
        faces = by_frame.get(line["frame"], [])
        pairs, kept = match_frame(line["people"], faces)
        gt_frames.append([(f["person"], f["box"]) for f in line["people"] if _counted(f)])
        pr_frames.append([(int(r["person"]), [float(r[k]) for k in ("x0", "y0", "x1", "y1")]) for r in kept
                          if r["person"] != ""])
        for face, row in pairs:
            truth_on = np.array([face["labels"][a] == 1 for a in aus])
            for kind, column in (("raw", "{}"), ("smooth", "{}_smooth")):
                on = np.array([int(row[column.format(a)]) == 1 for a in aus])
                counts[kind][:, 0] += on & truth_on
                counts[kind][:, 1] += on & ~truth_on
                counts[kind][:, 2] += ~on & truth_on
    return {**identity_scores(gt_frames, pr_frames, MIN_IOU), "counts": counts}


def f1(counts: np.ndarray) -> float:
    """Mean over AUs with a true positive frame of 2TP / (2TP + FP + FN)."""
    tp, fp, fn = counts.T
    has = (tp + fn) > 0
    return float(np.mean(2 * tp[has] / np.maximum(2 * tp[has] + fp[has] + fn[has], 1)))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def timed_detection(predictor) -> list[float]:
    """Wrap ``predictor``'s face detection so that the seconds it takes add up in the list returned."""
    spent = [0.0]
    detect = predictor.detector.detect

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return detect(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    predictor.detector.detect = timed
    return spent


def evaluate(model: str, root: str, settings: VideoSettings, people_known: bool = False,
             identity_weights: str | None = None, tracker: dict | None = None, detect_every: int = 1,
             predictor=None, **predict) -> dict:
    """Render the clips (kept when already there), predict on each, score each; totals over clips.
    ``identity_weights``: a face-recognition backbone to tell people apart (else the face branch);
    ``tracker``: :class:`TrackerSettings` fields other than the count; ``detect_every``: whole-frame
    detection on every N-th frame (``au-detect predict --detect_every``); ``predictor``: one
    already loaded (else ``model`` is)."""
    from experiments.predict import run
    from lightning_modules.serving.onnx_model import load_predictor
    from lightning_modules.serving.people import TrackerSettings

    summary = render_videos(root, settings)
    if predictor is None:
        predictor = load_predictor(model, "cpu")
        if identity_weights:
            predictor.use_identity_weights(identity_weights)
    predictor.detector.every = detect_every
    detecting = timed_detection(predictor)
    aus = [f"AU{a}" for a in predictor.aus]
    per_clip, counts = [], {"raw": 0, "smooth": 0}
    gt_total = {"idtp": 0, "true_faces": 0, "predicted_faces": 0, "switches": 0}
    seconds = frames = faces = 0.0
    for clip in summary["clips"]:
        video, truth_file = (Path(root) / name for name in clip_names(clip["clip"]))
        out = Path(root) / "predictions" / f"{video.stem}.csv"
        people = TrackerSettings(people=len(clip["people"]) if people_known else None, **(tracker or {}))
        start = time.perf_counter()
        result = run(predictor, [str(video)], str(out), progress=False, people=people, **predict)
        seconds += time.perf_counter() - start
        frames += result.frames
        rows = read_rows(out)
        faces += sum(r["status"] == "ok" for r in rows)
        scores = score_clip(read_truth(truth_file), rows, aus)
        per_clip.append({"clip": video.name, "people": len(clip["people"]), "idf1": scores["idf1"],
                         "switches": scores["switches"], "raw_f1": f1(scores["counts"]["raw"]),
                         "smooth_f1": f1(scores["counts"]["smooth"])})
        for k in gt_total:
            gt_total[k] += scores[k]
        for kind in counts:
            counts[kind] = counts[kind] + scores["counts"][kind]
    del predictor.detector.detect  # the class's own again
    idf1 = 2 * gt_total["idtp"] / max(gt_total["true_faces"] + gt_total["predicted_faces"], 1)
    return {"clips": per_clip, "idf1": idf1, "switches": gt_total["switches"], "raw_f1": f1(counts["raw"]),
            "smooth_f1": f1(counts["smooth"]), "frames": frames, "seconds": seconds, "faces": int(faces),
            "detection_seconds": detecting[0]}


def clip_parser(description: str) -> argparse.ArgumentParser:
    """The options the video benchmarks share: the model, how people are told apart, the clips."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="a checkpoint, MLflow model or predictor folder")
    parser.add_argument("--identity_weights", help="a face-recognition backbone checkpoint to tell people apart")
    parser.add_argument("--root", default="data/synthau_video")
    defaults = VideoSettings()
    for name in ("clips", "seconds", "fps", "width", "height"):
        parser.add_argument(f"--{name}", type=type(getattr(defaults, name)), default=getattr(defaults, name))
    return parser


def clip_settings(args: argparse.Namespace) -> VideoSettings:
    """The clips :func:`clip_parser`'s options ask for."""
    return VideoSettings(clips=args.clips, seconds=args.seconds, fps=args.fps, width=args.width, height=args.height)


def main(argv: list[str] | None = None) -> dict:
    parser = clip_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--smooth_s", type=float, default=0.5)
    parser.add_argument("--hysteresis", type=float, default=0.3)
    parser.add_argument("--people_known", action="store_true", help="pass each clip's count as --people")
    parser.add_argument("--detect_every", type=int, default=1, help="whole-frame detection on every N-th frame")
    args = parser.parse_args(argv)
    from lightning_modules.serving.signals import SmoothingSettings

    result = evaluate(args.model, args.root, clip_settings(args),
                      args.people_known, args.identity_weights, detect_every=args.detect_every,
                      smoothing=SmoothingSettings(window_s=args.smooth_s, hysteresis=args.hysteresis))
    print("| clip | people | IDF1 | switches | AU F1 raw | AU F1 smoothed |")
    print("|---|---|---|---|---|---|")
    for c in result["clips"]:
        print(f"| {c['clip']} | {c['people']} | {c['idf1']:.3f} | {c['switches']} | {c['raw_f1']:.3f} | "
              f"{c['smooth_f1']:.3f} |")
    print(f"| all | | **{result['idf1']:.3f}** | {result['switches']} | {result['raw_f1']:.3f} | "
          f"**{result['smooth_f1']:.3f}** |")
    print(f"\n{result['frames']:.0f} frames in {result['seconds']:.1f} s "
          f"({result['frames'] / max(result['seconds'], 1e-9):.1f} frames/s, whole-frame detection every "
          f"{args.detect_every} frames)")
    return result


if __name__ == "__main__":
    main()
