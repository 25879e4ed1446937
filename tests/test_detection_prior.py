"""The detection prior in video: a frame after one whose faces are known is searched around them
(R- and O-net) and, for faces entering, among P-net's candidates away from them; the whole-frame
cascade runs on every N-th frame, the first of each call and where a face is lost. Checked on
SynthAU clips with real MTCNN: the same faces as whole-frame detection on every frame, a face
entering found on the frame it enters, a lost face re-detected, and every=1 exactly the old path."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from datamodules.alignment.align import AlignmentSettings, Detection, FaceDetector, box_iou, detection_copy
from datamodules.io.sources import Frame, Source
from datamodules.synthau.video import VideoSettings, clip_names, read_truth, render_videos
from lightning_modules.backbones import create_backbone
from lightning_modules.serving.predictor import inference_copy_of_backbone

from .training_helpers import video_predictor

CLIPS = VideoSettings(clips=1, people=(3, 3), seconds=8.0, fps=8.0, width=320, height=240, seed=2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[list[np.ndarray], list[dict]]:
    root = tmp_path_factory.mktemp("prior")
    render_videos(root, CLIPS, workers=1)
    video, truth = (root / name for name in clip_names(0))
    capture, frames = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames, read_truth(truth)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(AlignmentSettings(), "cpu")


def _detect(detector: FaceDetector, frames: list[np.ndarray], every: int, batch: int = 16) -> list[Detection]:
    detector.every, detector.counts = every, dict.fromkeys(detector.counts, 0)
    found = []
    for i in range(0, len(frames), batch):
        part = frames[i:i + batch]
        found += detector.detect(part, follows=[j > 0 for j in range(len(part))])
    return found


def _matched(a: Detection, b: Detection, iou: float = 0.5) -> int:
    """Faces of ``a`` with a face of ``b`` overlapping it at least ``iou``."""
    return sum(any(box_iou(p, q) >= iou for q in b.boxes) for p in a.boxes)


def test_every_one_is_the_whole_frame_cascade_exactly(clip, detector):
    frames, _ = clip
    whole = detector.detect(frames[:8])
    followed = _detect(detector, frames[:8], every=1)
    assert detector.counts == {"whole": 8, "followed": 0, "lost": 0}
    for a, b in zip(whole, followed):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.landmarks, b.landmarks)


def test_the_prior_finds_the_faces_of_every_frame_detection(clip, detector):
    """Over a clip of three people crossing and leaving: within 1 % of whole-frame detection's
    faces, each matched at IoU 0.5, landmarks within a few pixels; most frames followed."""
    frames, truth = clip
    whole = _detect(detector, frames, every=1)
    prior = _detect(detector, frames, every=8)
    counts = dict(detector.counts)
    n_whole, n_prior = sum(map(len, whole)), sum(map(len, prior))
    assert n_whole > 2 * len(frames) * 0.8  # a clip with people in it
    assert abs(n_prior - n_whole) <= 0.01 * n_whole
    assert sum(_matched(a, b) for a, b in zip(whole, prior)) >= 0.99 * n_whole
    assert counts["followed"] >= 0.75 * len(frames) and counts["whole"] < 0.35 * len(frames)
    errors = []
    for a, b in zip(whole, prior):
        for box, marks in zip(a.boxes, a.landmarks):
            j = int(np.argmax([box_iou(box, q) for q in b.boxes])) if len(b) else None
            if j is not None and box_iou(box, b.boxes[j]) >= 0.5:
                errors.append(np.linalg.norm(marks - b.landmarks[j], axis=1).mean() / (box[2] - box[0]))
    assert np.median(errors) < 0.05  # of the face's width


def test_a_followed_face_says_which_face_of_the_frame_before_it_continues(clip, detector):
    """Over the clip: frames detected whole say nothing (``follows`` None); in a followed frame
    each face carries the index of the face of the frame before it was found around (its box
    overlapping that face's by half at least, the nearest of them), or -1 for a face found anew."""
    frames, _ = clip
    found = _detect(detector, frames, every=8)
    followed = [i for i, d in enumerate(found) if d.follows is not None]
    # a frame followed, then detected whole for a lost face, says nothing either
    assert len(followed) == detector.counts["followed"] - detector.counts["lost"] >= 0.6 * len(frames)
    assert all(found[i].follows is None for i in range(len(found)) if i not in followed)
    continued = 0
    for i in followed:
        d, before = found[i], found[i - 1]
        assert d.follows.shape == (len(d),) and d.follows.dtype.kind == "i"
        assert len(set(d.follows[d.follows >= 0].tolist())) == int((d.follows >= 0).sum())  # one face each
        for box, j in zip(d.boxes, d.follows):
            if j >= 0:
                ious = [box_iou(box, q) for q in before.boxes]
                assert ious[j] >= 0.5 and ious[j] == max(ious)
                continued += 1
    assert continued >= 0.95 * sum(len(found[i]) for i in followed)


def test_a_face_entering_between_whole_detections_is_found_at_once(clip, detector):
    """A frame where a face has just come in, after one without it: the prior does not know it;
    P-net's candidates away from known faces find it on that very frame."""
    frames, truth = clip
    one = detector.detect([frames[0]])[0]
    assert len(one) >= 2
    keep = int(np.argmax(one.boxes[:, 0]))  # the frame before knew only one of its faces
    prior = Detection(one.boxes[keep:keep + 1], one.scores[keep:keep + 1], one.landmarks[keep:keep + 1])
    copy = detection_copy(frames[0], detector.settings.detect_max_side)
    found = detector.follow_copy(*copy, prior, detector.propose_copies([copy], [0])[0])
    assert len(found) == len(one) and _matched(one, found) == len(one)
    # the known face continues the prior's only face; the others are new
    known = int(np.argmax([box_iou(one.boxes[keep], q) for q in found.boxes]))
    assert found.follows.tolist() == [0 if j == known else -1 for j in range(len(found))]


def test_a_lost_face_makes_the_frame_detected_whole(clip, detector):
    """The people gone from one frame to the next (a cut to an empty shot): the followed frame
    finds none of the known faces, so it is detected whole, and answers what whole detection does."""
    frames, _ = clip
    empty = np.full_like(frames[0], 128)
    detector.every, detector.counts = 100, dict.fromkeys(detector.counts, 0)
    found = detector.detect([frames[0], empty, empty], follows=[False, True, True])
    assert len(found[0]) >= 2 and len(found[1]) == len(found[2]) == 0
    # frame 1 lost its faces and was detected whole; frame 2 had none to follow: nothing to lose
    assert detector.counts == {"whole": 2, "followed": 2, "lost": 1}


def test_a_batch_and_another_video_start_afresh(clip):
    """The predictor follows a frame only from the frame before it in the same video and batch,
    and a video's frames (first or after another input) start a batch: a run resumed at a batch
    boundary, or a rank given the video alone, finds the faces an uninterrupted one found."""
    from lightning_modules.serving.predictor import AUPredictor

    frames, _ = clip
    seen: list[list[bool]] = []

    class Recorder:
        def predict(self, pixels, copies, embed, follows):
            seen.append(list(follows))
            return [[] for _ in pixels]

    a, b, photo = Source("a.avi", "video"), Source("b.avi", "video"), Source("p.jpg", "image")
    stream = [Frame(a, 0, 0.0, frames[0]), Frame(a, 1, 0.1, frames[1]), Frame(photo, pixels=frames[2]),
              Frame(a, 2, 0.2, frames[2]), Frame(b, 0, 0.0, frames[3]), Frame(b, 1, 0.1, frames[4]),
              Frame(b, 2, 0.2, frames[5])]
    recorder = Recorder()
    list(AUPredictor.predict_batches(recorder, stream, batch_frames=5))
    assert seen == [[False, True, False], [False], [False, True, True]]


def test_detect_every_is_checked():
    from experiments.predict import predict

    with pytest.raises(ValueError, match="--detect_every must be at least 1"):
        predict("unused.ckpt", ["x.jpg"], detect_every=0)
    with pytest.raises(ValueError, match="detect_every must be at least 1"):
        FaceDetector(AlignmentSettings(), "cpu", every=0)


def test_faces_the_prior_follows_are_not_embedded_again(clip):
    """With an identity network, a face followed from the frame before is not embedded (who it is
    was known a frame ago): only faces of frames detected whole and faces found anew go through
    it. Each followed face names the face it continues among the frame before's, largest first."""
    frames, _ = clip
    predictor = video_predictor()
    seen = []

    class Counted(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            seen.append(len(x))
            return self.net(x)

    predictor.identity_net = Counted(inference_copy_of_backbone(create_backbone("resnet18", None)[0]))
    predictor.detector.every = 8
    faces = predictor.predict(frames[:24], embed=True, follows=[i > 0 for i in range(24)])
    followed = [f for frame in faces for f in frame if f.follows is not None]
    fresh = [f for frame in faces for f in frame if f.follows is None]
    assert len(followed) > len(fresh) and sum(seen) == len(fresh)
    assert all(f.embedding is None for f in followed) and all(f.embedding.shape == (512,) for f in fresh)
    for before, now in zip(faces, faces[1:]):
        for face in now:
            if face.follows is not None:
                assert box_iou(face.box, before[face.follows].box) >= 0.5
    # without an identity network the face branch's embedding comes with the AU pass: every face has one
    predictor.identity_net = None
    faces = predictor.predict(frames[:24], embed=True, follows=[i > 0 for i in range(24)])
    assert all(f.embedding is not None for frame in faces for f in frame)
