"""Face crop throughput: alignment version 2 (halvings of the face's own window) against version 1
(the whole image area-resized to twice the crop's scale), on the same faces in the same process.

Faces are the labelled faces of SynthAU scenes, at their own 640x480 and with the scenes upscaled
to 3840x2880 (a phone photo's size, where version 1 resized 11 MP for every face). Only faces
larger than the crop take the shrinking path; all are counted. Quality against a supersampled
reference is checked in ``tests/test_alignment.py::test_shrunk_face_matches_a_supersampled_crop``.

    python benchmarks/crop_throughput.py [--faces 100] [--repeats 5] [--crop 96]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import alternate, print_table  # noqa: E402
from datamodules.alignment.align import AlignmentSettings, warp_face  # noqa: E402
from datamodules.io.images import read_image  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402


def crops(faces: list[tuple[np.ndarray, np.ndarray]], settings: AlignmentSettings) -> tuple[float, int]:
    start = time.perf_counter()
    for image, landmarks in faces:
        warp_face(image, landmarks, settings)
    return len(faces) / (time.perf_counter() - start), len(faces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--crop", type=int, default=96)
    args = parser.parse_args()
    new = AlignmentSettings(crop_size=args.crop)
    old = dataclasses.replace(new, version=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthau"
        generate_synthau(root, SynthAUSettings(num_images=args.faces, seed=5, val_fraction=0, test_fraction=0))
        records = [json.loads(line) for line in (root / "faces.jsonl").read_text().splitlines()]
        small = [(read_image(str(root / r["image"])), np.array(r["faces"][0]["landmarks"])) for r in records]
    big = [(cv2.resize(image, None, fx=6, fy=6, interpolation=cv2.INTER_LINEAR), lm * 6) for image, lm in small[:20]]
    for name, faces in (("640x480", small), ("3840x2880", big)):
        results = alternate({f"{name}, version 1: whole image area-resized (baseline)": lambda: crops(faces, old),
                             f"{name}, version 2: halvings of the face's window": lambda: crops(faces, new)},
                            args.repeats)
        print(f"\n{len(faces)} faces, crop {args.crop} px, {args.repeats} repeats\n")
        print_table(results, "faces/s", "faces", "d")


if __name__ == "__main__":
    main()
