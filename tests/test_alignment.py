"""Alignment: the similarity transform, the face crop, MTCNN on SynthAU against ground truth."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from datamodules.alignment.align import (AlignmentSettings, FaceDetector, box_iou, detection_copy, similarity_transform,
                                   warp_face)
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
from datamodules.io.images import read_image
from datamodules.io.manifest import read_manifest
from datamodules.synthau.generate import SynthAUSettings, generate_synthau


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, t = 0.4, 1.7, np.array([12.0, -5.0])
    R = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    M = similarity_transform(src, src @ R.T + t)
    np.testing.assert_allclose(M, np.hstack([R, t[:, None]]), atol=1e-9)


def test_similarity_matches_opencv_least_squares():
    """With noisy points, the same least-squares answer as OpenCV's estimator without outlier rejection."""
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    dst = src * 0.8 + 20 + rng.normal(0, 2, src.shape)
    ours = similarity_transform(src, dst)
    cv, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS, refineIters=50)
    # LMEDS keeps all 5 points here (small noise); its refinement is the same least-squares problem.
    np.testing.assert_allclose(ours, cv, atol=0.05)
    residual = np.linalg.norm(src @ ours[:, :2].T + ours[:, 2] - dst, axis=1).mean()
    assert residual < 4


def test_warp_puts_landmarks_on_the_template():
    settings = AlignmentSettings(crop_size=96)
    lm = np.array([[300.0, 200], [360, 205], [330, 240], [305, 275], [355, 278]])
    image = np.zeros((480, 640, 3), np.uint8)
    for p in lm:
        cv2.circle(image, tuple(int(v) for v in p), 3, (255, 255, 255), -1)
    crop = warp_face(image, lm, settings)
    assert crop.shape == (96, 96, 3)
    M = similarity_transform(lm, settings.template())
    mapped = lm @ M[:, :2].T + M[:, 2]
    assert np.abs(mapped - settings.template()).max() < 3  # 5 points, 4 degrees of freedom
    for p in mapped:  # the white dots land where the landmarks are mapped
        assert crop[int(round(p[1])), int(round(p[0]))].max() > 100


@pytest.mark.parametrize("zoom", [1, 6])
def test_shrunk_face_matches_a_supersampled_crop(synthau, truth, zoom):
    """A face larger than the crop is antialiased: the crop is within a grey level (mean) of a
    reference that samples every crop pixel 16x16 times and averages, and closer to it than
    alignment version 1 (whole image area-resized) was. ``zoom`` 6 makes the scene 3840x2880."""
    refs = [ref for ref, r in truth.items() if len(r["faces"]) == 1][:6]
    settings = AlignmentSettings(crop_size=64)
    old = dataclasses.replace(settings, version=1)
    ours, version1, reference = [], [], []
    for ref in refs:
        image = read_image(str(synthau / ref))
        if zoom > 1:
            image = cv2.resize(image, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC)
        lm = np.array(truth[ref]["faces"][0]["landmarks"]) * zoom
        M = similarity_transform(lm, settings.template())
        assert np.sqrt(np.linalg.det(M[:, :2])) < 0.5  # the face is shrunk
        fine = np.hstack([16 * M[:, :2], 16 * M[:, 2:] + 7.5])  # crop pixel c <-> fine pixels 16c..16c+15
        big = cv2.warpAffine(image, fine, (64 * 16, 64 * 16), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        reference.append(cv2.resize(big, (64, 64), interpolation=cv2.INTER_AREA).astype(float))
        ours.append(warp_face(image, lm, settings).astype(float))
        version1.append(warp_face(image, lm, old).astype(float))
    err = np.abs(np.stack(ours) - np.stack(reference))
    err1 = np.abs(np.stack(version1) - np.stack(reference))
    print(f"\nzoom {zoom}: mean error {err.mean():.2f} (version 1: {err1.mean():.2f}), p99 {np.percentile(err, 99):.1f}")
    assert err.mean() < 1.0 and np.percentile(err, 99) < 10
    assert err.mean() < err1.mean()


def test_big_face_is_detected_on_a_downscaled_copy():
    image = np.zeros((1200, 1600, 3), np.uint8)
    copy, f = detection_copy(image, 320)
    assert f == pytest.approx(0.2)
    assert copy.shape == (256, 320, 3)  # 240 padded to a multiple of 32 for batching


def test_detector_finds_synthau_faces(synthau, truth):
    """Boxes and landmarks against what the renderer drew: IoU and error in inter-ocular distances."""
    detector = FaceDetector(AlignmentSettings())
    m = read_manifest(synthau / "val.tsv")
    images = [read_image(m.resolve(i)) for i in range(len(m))]
    found, nme = 0, []
    for ref, det in zip(m.images, detector.detect(images)):
        gt = truth[ref]["faces"][0]
        if not len(det):
            continue
        j = det.pick("largest")
        if box_iou(det.boxes[j], gt["box"]) > 0.4:
            found += 1
            lm = np.array(gt["landmarks"])
            nme.append(np.linalg.norm(det.landmarks[j] - lm, axis=1).mean() / np.linalg.norm(lm[0] - lm[1]))
    assert found >= len(m) - 1
    assert np.median(nme) < 0.15, nme


@pytest.mark.slow
def test_detection_rate_at_default_settings(tmp_path):
    """MTCNN finds the face in at least 95 % of SynthAU scenes (400 scenes, default settings)."""
    root = tmp_path / "synthau"
    generate_synthau(root, SynthAUSettings(num_images=400, seed=11, val_fraction=0.0, test_fraction=0.0), workers=2)
    report = AlignedSplit.open(align_manifest(read_manifest(root / "train.tsv"), tmp_path / "cache")).report
    print(f"\nface rate {report['face_rate']:.3f} on {report['images']} scenes, {report['images_per_second']} images/s")
    assert report["face_rate"] >= 0.95


def test_batched_cascade_agrees_with_facenet(synthau, truth):
    """The roi_align cascade finds the faces facenet-pytorch's own detect_face finds, in the same
    places, and its landmarks are as close to the drawn ones."""
    detector = FaceDetector(AlignmentSettings(min_face_size=20))
    m = read_manifest(synthau / "val.tsv")
    copies = [detection_copy(read_image(m.resolve(i)), 320) for i in range(len(m))]
    ours = detector.detect_copies([c for c, _ in copies], [1.0] * len(copies))
    boxes, scores, points = detector.mtcnn.detect(np.stack([c for c, _ in copies]), landmarks=True)
    matched, err_ours, err_facenet = 0, [], []
    for ref, (c, f), d, b, p in zip(m.images, copies, ours, boxes, points):
        if b is None:
            continue
        for box, lm in zip(b, p):  # every face facenet finds, ours finds too
            best = max(range(len(d)), key=lambda j: box_iou(d.boxes[j], box), default=None)
            assert best is not None and box_iou(d.boxes[best], box) > 0.7
            iod = np.linalg.norm(lm[0] - lm[1])
            assert np.linalg.norm(d.landmarks[best] - lm, axis=1).mean() < 0.2 * iod
            matched += 1
            gt = np.array(truth[ref]["faces"][0]["landmarks"]) * f
            if box_iou(box, np.array(truth[ref]["faces"][0]["box"]) * f) > 0.4:
                gt_iod = np.linalg.norm(gt[0] - gt[1])
                err_ours.append(np.linalg.norm(d.landmarks[best] - gt, axis=1).mean() / gt_iod)
                err_facenet.append(np.linalg.norm(lm - gt, axis=1).mean() / gt_iod)
    assert matched >= len(m)
    assert np.median(err_ours) <= np.median(err_facenet) + 0.01
