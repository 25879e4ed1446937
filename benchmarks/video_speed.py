"""Video prediction with the detection prior against whole-frame detection on every frame:
``au-detect predict`` on SynthAU clips (people crossing, leaving and coming back) once with
``--detect_every 1`` and once with ``--detect_every N``, alternated over repeats in one run (the
machine is shared: medians and their ratio). Reported for each: frames/s of the whole predict
(decoding, detection, alignment, the network, people, smoothing, writing), frames/s of detection
alone, faces found, and the clips' IDF1 and AU F1, so that what the speed costs is in the same row.

    python benchmarks/video_speed.py --model runs/demo/.../best.ckpt [--identity_weights checkpoints/face_resnet18.pt]
    python benchmarks/video_speed.py --model <au-detect export folder> --backend onnxruntime [--identity_weights ...]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.video_people import clip_parser, clip_settings, evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = clip_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--detect_max_side", type=int, help="detection copy size (default: the model's)")
    parser.add_argument("--detect_every", type=int, default=10, help="N of the prior's run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch", help="what runs the AU network")
    args = parser.parse_args(argv)
    from lightning_modules.serving.onnx_model import load_predictor

    predictor = load_predictor(args.model, "cpu", args.backend, detect_max_side=args.detect_max_side)
    if args.identity_weights:
        predictor.use_identity_weights(args.identity_weights)
    settings = clip_settings(args)
    runs: dict[int, list[dict]] = {1: [], args.detect_every: []}
    for _ in range(args.repeats):
        for every in runs:
            runs[every].append(evaluate(args.model, args.root, settings, predictor=predictor, detect_every=every))
    rows = {}
    for every, results in runs.items():
        last = results[-1]
        rows[every] = {"fps": statistics.median(r["frames"] / r["seconds"] for r in results),
                       "detection_fps": statistics.median(r["frames"] / r["detection_seconds"] for r in results),
                       "faces": last["faces"], "idf1": last["idf1"], "switches": last["switches"],
                       "raw_f1": last["raw_f1"], "smooth_f1": last["smooth_f1"], "frames": last["frames"]}
    base, prior = rows[1], rows[args.detect_every]
    print(f"{base['frames']:.0f} frames of {args.clips} clips ({args.width}x{args.height}, {args.fps:g} fps, detection "
          f"copies of {predictor.alignment.detect_max_side} px), AU network in {args.backend}, {args.repeats} repeats, "
          "medians\n")
    print("| detection | predict frames/s | detection frames/s | faces | IDF1 | switches | AU F1 raw | AU F1 smoothed |")
    print("|---|---|---|---|---|---|---|---|")
    for every, r in rows.items():
        label = "whole frame, every frame" if every == 1 else f"prior, whole frame every {every}"
        print(f"| {label} | {r['fps']:.2f} | {r['detection_fps']:.1f} | {r['faces']} | {r['idf1']:.3f} | "
              f"{r['switches']} | {r['raw_f1']:.3f} | {r['smooth_f1']:.3f} |")
    print(f"\npredict {prior['fps'] / base['fps']:.2f}x, detection {prior['detection_fps'] / base['detection_fps']:.2f}x, "
          f"faces {(prior['faces'] - base['faces']) / max(base['faces'], 1):+.2%}")
    return rows


if __name__ == "__main__":
    main()
