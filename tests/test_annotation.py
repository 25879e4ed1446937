"""Annotated copies: where the AU panels go, what they say, what drawing touches, and the videos."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.io.sources import Frame, Source
from experiments.annotation import (CODECS, OFF_TEXT, ON_TEXT, Annotator, Codec, Style, annotate, choose_codec,
                                    labels, panel_lines, place_panels, probe, video_codec)
from lightning_modules.serving.predictor import Face

AUS = [1, 2, 4, 6, 12, 25]
W, H = 640, 480


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _inside(r, width=W, height=H) -> bool:
    return 0 <= r[0] < r[2] <= width and 0 <= r[1] < r[3] <= height


def _face(box, probs, on) -> Face:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    landmarks = np.array([[x0 + .3 * w, y0 + .4 * h], [x0 + .7 * w, y0 + .4 * h], [x0 + .5 * w, y0 + .6 * h],
                          [x0 + .35 * w, y0 + .8 * h], [x0 + .65 * w, y0 + .8 * h]])
    return Face(np.asarray(box, float), landmarks, 0.99, np.asarray(probs, float), np.asarray(on, bool))


# Faces at each edge and corner, some reaching past the frame as MTCNN boxes can.
EDGES = {"top-left": (-10, -10, 90, 110), "top": (270, 0, 370, 120), "top-right": (560, -5, 650, 100),
         "right": (545, 180, 640, 300), "bottom-right": (540, 380, 645, 490), "bottom": (270, 370, 370, 480),
         "bottom-left": (0, 360, 100, 480), "left": (-20, 180, 80, 300), "centre": (270, 180, 370, 300)}


@pytest.mark.parametrize("where", list(EDGES))
def test_a_panel_stays_inside_the_frame_and_off_its_face_at_every_edge(where):
    box = EDGES[where]
    (rect,) = place_panels([box], [(130, 90)], (W, H), gap=4)
    assert _inside(rect), rect
    assert (rect[2] - rect[0], rect[3] - rect[1]) == (130, 90)
    assert _overlap(rect, box) == 0


def test_a_panel_larger_than_the_frame_is_cut_to_it():
    (rect,) = place_panels([(100, 100, 200, 200)], [(900, 700)], (W, H))
    assert rect == (0, 0, W, H)


def test_right_of_the_face_first_then_left_then_above_or_below():
    right, left, above, below = (place_panels([box], [(120, 60)], (W, H), gap=4)[0] for box in
                                 [(100, 200, 200, 300), (520, 200, 600, 300), (10, 200, 630, 470), (10, 10, 630, 300)])
    assert right[0] == 204 and right[1] == 200
    assert left[2] == 516
    assert above[3] == 196
    assert below[1] == 304


def test_a_panel_slides_along_its_side_rather_than_leave_it():
    (rect,) = place_panels([(300, 420, 380, 480)], [(130, 90)], (W, H), gap=4)  # a face on the bottom edge
    assert rect == (384, 390, 514, 480)  # still right of it, moved up into the frame


def test_side_by_side_faces_get_panels_off_each_other():
    boxes = [(200, 150, 320, 300), (340, 150, 460, 300)]  # 20 px apart: no room for a panel between
    rects = place_panels(boxes, [(110, 80), (110, 80)], (W, H), gap=4)
    for k, rect in enumerate(rects):
        assert _inside(rect)
        assert _overlap(rect, boxes[1 - k]) == 0, (k, rect)
        assert _overlap(rect, boxes[k]) == 0
    assert _overlap(*rects) == 0
    assert rects[0][2] <= boxes[0][0] and rects[1][0] >= boxes[1][2]  # the left face's panel went left


def test_with_no_free_spot_a_panel_takes_the_least_overlap_inside_the_frame():
    # A strip of three faces: beside the middle one are its neighbours, above and below the frame's edge.
    boxes = [(100, 10, 220, 110), (0, 10, 90, 110), (230, 10, 320, 110)]
    rects = place_panels(boxes, [(80, 40)] * 3, (320, 120), gap=4)
    assert all(_inside(r, 320, 120) for r in rects)
    # Right or left would cover 78 x 40 of a neighbour; moved down into the frame, above covers
    # 80 x 30 of its own face and nobody else's.
    assert rects[0] == (100, 0, 180, 40)


def test_panel_lists_the_aus_on_with_probabilities_highest_first():
    face = _face((0, 0, 10, 10), [0.1, 0.62, 0.3, 0.91, 0.87, 0.4], [0, 1, 0, 1, 1, 0])
    assert panel_lines(face, AUS) == [("AU6 0.91", True), ("AU12 0.87", True), ("AU2 0.62", True)]


def test_a_face_with_no_au_on_says_so_and_shows_its_top_three_greyed():
    face = _face((0, 0, 10, 10), [0.1, 0.2, 0.45, 0.05, 0.3, 0.01], [0] * 6)
    lines = panel_lines(face, AUS)
    assert lines[0][0].lower().startswith("no au")
    assert lines[1:] == [("AU4 0.45", False), ("AU12 0.30", False), ("AU2 0.20", False)]


def test_text_grows_with_the_image():
    small, large = Style.for_frame(480, 640), Style.for_frame(2160, 3840)
    assert 10 <= small.text_height <= 16
    assert 40 <= large.text_height <= 70
    assert large.line > small.line and large.text_thickness > small.text_thickness
    assert Style.for_frame(640, 480) == small  # portrait like landscape


def _scene(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (9, 9), 0)


def test_drawing_changes_pixels_only_on_boxes_and_panels():
    frame = _scene()
    faces = [_face((200, 150, 320, 300), [0.1, 0.62, 0.3, 0.91, 0.87, 0.4], [0, 1, 0, 1, 1, 0]),
             _face((340, 150, 460, 300), [0.1, 0.2, 0.45, 0.05, 0.3, 0.01], [0] * 6)]
    before = frame.copy()
    image = annotate(frame, faces, AUS)
    assert np.array_equal(frame, before)  # a copy
    changed = np.any(image != cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), axis=2)

    style = Style.for_frame(H, W)
    drawn = np.zeros((H, W), bool)
    reach = style.line + 1  # half a stroke, rounded up, and anti-aliasing
    for face in faces:
        x0, y0, x1, y1 = (int(v) for v in face.box)
        drawn[y0 - reach:y1 + reach + 1, x0 - reach:x1 + reach + 1] = True
    placed = labels(frame.shape, faces, AUS)
    for label in placed:
        x0, y0, x1, y1 = label.rect
        drawn[y0:y1, x0:x1] = True
    assert changed.any()
    assert not (changed & ~drawn).any(), np.argwhere(changed & ~drawn)[:5]

    for label, colour in zip(placed, (ON_TEXT, OFF_TEXT)):
        x0, y0, x1, y1 = label.rect
        assert _overlap(label.rect, faces[0].box) == 0 and _overlap(label.rect, faces[1].box) == 0
        panel = image[y0:y1, x0:x1]
        assert changed[y0:y1, x0:x1].mean() > 0.9  # filled
        assert np.all(panel == colour, axis=2).sum() > 20  # its text: white when on, grey when not


def _source_video(path: Path, n: int, fps: float) -> list[np.ndarray]:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    assert writer.isOpened()
    frames = [np.roll(_scene(), 8 * k, axis=1) for k in range(n)]
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return frames


# What cv2.VideoCapture reports for each codec's files.
READ_BACK = {"avc1": {"avc1", "h264", "H264"}, "VP90": {"VP90", "vp09"}, "mp4v": {"mp4v", "FMP4"}}


def test_an_annotated_video_reads_back_in_the_chosen_codec(tmp_path):
    clip, photo = tmp_path / "in" / "clip.mp4", tmp_path / "in" / "photo.png"
    clip.parent.mkdir()
    pixels = _source_video(clip, 12, fps=10)
    cv2.imwrite(str(photo), pixels[0])
    sources = [Source(str(clip), "video"), Source(str(photo), "image")]
    annotator = Annotator(str(tmp_path / "out"), [str(tmp_path / "in")], sources, every=2)
    faces = [_face((200, 150, 320, 300), [0.1, 0.62, 0.3, 0.91, 0.87, 0.4], [0, 1, 0, 1, 1, 0])]
    for k in range(0, 12, 2):
        annotator.add(Frame(sources[0], frame=k, time_s=k / 10, pixels=pixels[k]), faces, AUS)
    annotator.add(Frame(sources[1], pixels=pixels[0]), faces, AUS)
    annotator.close()

    codec = video_codec()
    target = annotator.targets[str(clip)]
    assert target == tmp_path / "out" / ("clip" + codec.suffix)
    cap = cv2.VideoCapture(str(target))
    try:
        assert cap.isOpened()
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("ascii", "replace")
        assert fourcc in READ_BACK[codec.fourcc], fourcc
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
        read = 0
        while True:
            ok, image = cap.read()
            if not ok:
                break
            assert image.shape[:2] == (H, W)
            read += 1
        assert read == 6
    finally:
        cap.release()
    assert cv2.imread(str(tmp_path / "out" / "photo.jpg")).shape == (H, W, 3)


def test_the_chosen_codec_is_the_first_that_writes():
    codec = video_codec()
    assert codec in CODECS and probe(codec)
    assert all(not probe(c) for c in CODECS[:CODECS.index(codec)])


def test_a_codec_browsers_cannot_play_is_chosen_only_last_and_with_a_warning(caplog):
    nowhere = Codec("avc1", ".no-such-container", "H.264", True)  # no muxer: never opens
    old = Codec("mp4v", ".mp4", "MPEG-4 Part 2", False)
    with caplog.at_level(logging.WARNING, logger="experiments.annotation"):
        assert choose_codec([nowhere, old]) == old
    assert len(caplog.records) == 1 and "browsers" in caplog.text and "H.264" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="experiments.annotation"):
        assert choose_codec([old, nowhere]).fourcc == "mp4v"  # last resort only when nothing else writes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="experiments.annotation"):
        assert choose_codec([nowhere, video_codec()]) == video_codec()
    assert caplog.records == [] or not video_codec().plays_in_browsers


def test_probing_keeps_encoder_errors_off_the_terminal(capfd):
    for codec in CODECS:
        probe(codec)
    assert capfd.readouterr().err == ""
