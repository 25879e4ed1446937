"""People across frames: the MOT measures against py-motmetrics, and the tracker on made-up
sequences (crossing, leaving and coming back, a known count, resuming from its state)."""

from __future__ import annotations

import motmetrics as mm
import numpy as np
import pytest

from lightning_modules.serving.people import PeopleTracker, TrackerSettings, box_iou, identity_scores


def _iou(a, b) -> float:
    """IoU of two x0 y0 x1 y1 boxes, written out (the reference the tests' distances use)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _motmetrics(truth, predicted, min_iou=0.5) -> dict:
    acc = mm.MOTAccumulator(auto_id=True)
    for gt, pr in zip(truth, predicted):
        dist = np.array([[1 - _iou(g, p) for _, p in pr] for _, g in gt], float).reshape(len(gt), len(pr))
        dist[dist > 1 - min_iou] = np.nan
        acc.update([g for g, _ in gt], [p for p, _ in pr], dist)
    summary = mm.metrics.create().compute(acc, metrics=["idf1", "idp", "idr", "num_switches"], name="run")
    return {k: float(summary[k].iloc[0]) for k in ("idf1", "idp", "idr", "num_switches")}


def _random_run(seed: int, frames: int = 60, people: int = 4):
    """True people walking with jitter, entering and leaving; predictions that copy them with
    box noise, misses, false faces, and ids that swap or restart now and then."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 300, (people, 2))
    speed = rng.normal(0, 4, (people, 2))
    present = [(int(a), int(a + b)) for a, b in zip(rng.integers(0, frames // 2, people),
                                                    rng.integers(frames // 4, frames, people))]
    mapping = {g: 100 + g for g in range(people)}
    truth, predicted = [], []
    for t in range(frames):
        gt, pr = [], []
        if rng.uniform() < 0.05:  # an id swap between two people, or a restart under a new id
            a, b = rng.choice(people, 2, replace=False)
            if rng.uniform() < 0.5:
                mapping[a], mapping[b] = mapping[b], mapping[a]
            else:
                mapping[a] = 200 + t
        for g in range(people):
            if not present[g][0] <= t < present[g][1]:
                continue
            x, y = start[g] + speed[g] * t
            box = [x, y, x + 60, y + 70]
            gt.append((g, box))
            if rng.uniform() < 0.9:
                jitter = rng.normal(0, 6, 4)
                pr.append((mapping[g], [box[0] + jitter[0], box[1] + jitter[1], box[2] + jitter[2], box[3] + jitter[3]]))
        if rng.uniform() < 0.1:
            x, y = rng.uniform(0, 300, 2)
            pr.append((999, [x, y, x + 50, y + 50]))
        truth.append(gt)
        predicted.append(pr)
    return truth, predicted


@pytest.mark.parametrize("seed", range(8))
def test_identity_scores_equal_py_motmetrics(seed):
    truth, predicted = _random_run(seed)
    got, ref = identity_scores(truth, predicted), _motmetrics(truth, predicted)
    assert got["idf1"] == pytest.approx(ref["idf1"], abs=1e-9)
    assert got["idp"] == pytest.approx(ref["idp"], abs=1e-9) and got["idr"] == pytest.approx(ref["idr"], abs=1e-9)
    assert got["switches"] == ref["num_switches"]
    assert 0.2 < got["idf1"] < 0.99  # the runs are neither perfect nor hopeless


def test_identity_scores_by_hand():
    a, b = [0, 0, 10, 10], [20, 0, 30, 10]
    # frames 1-2: true 1 -> predicted 7; frame 3: true 1 -> 8 (a switch); true 2 missed in frame 3
    truth = [[(1, a), (2, b)], [(1, a), (2, b)], [(1, a), (2, b)]]
    predicted = [[(7, a), (9, b)], [(7, a), (9, b)], [(8, a)]]
    s = identity_scores(truth, predicted)
    # IDTP = 2 (1<->7) + 2 (2<->9) = 4; IDF1 = 2*4 / (6 + 5)
    assert s["idtp"] == 4 and s["idf1"] == pytest.approx(8 / 11) and s["switches"] == 1
    assert s["idr"] == pytest.approx(4 / 6) and s["idp"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="3 frames of truth, 2 predicted"):
        identity_scores(truth, predicted[:2])


def test_box_iou_equals_the_written_out_formula():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 50, (6, 2))
    a = np.concatenate([a, a + rng.uniform(1, 40, (6, 2))], 1)
    b = rng.uniform(0, 50, (5, 2))
    b = np.concatenate([b, b + rng.uniform(1, 40, (5, 2))], 1)
    expected = np.array([[_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(box_iou(a, b), expected, atol=1e-12)


def _faces(rng, identities, people_boxes, noise=0.15):
    """Embeddings as a face branch gives them: non-negative, one direction per identity plus noise."""
    return np.stack([np.abs(identities[p] + rng.normal(0, noise, identities.shape[1])) for p in people_boxes])


def _crossing(rng, frames=40, identities=None):
    """Two people walking towards each other along one line, crossing at frame 20 (boxes overlap
    for several frames), the left one in front."""
    boxes = []
    for t in range(frames):
        xa, xb = 20 + 8 * t, 340 - 8 * t
        boxes.append({0: [xa, 100, xa + 80, 190], 1: [xb, 105, xb + 76, 190]})
    return boxes


def test_two_people_crossing_keep_their_ids_with_embeddings():
    rng = np.random.default_rng(1)
    identities = np.abs(rng.normal(0, 1, (2, 64)))
    tracker = PeopleTracker()
    truth, predicted = [], []
    for t, frame in enumerate(_crossing(rng)):
        visible = list(frame)
        if 17 <= t <= 23:  # the one behind is hidden while they overlap most
            visible = [0]
        boxes = np.array([frame[p] for p in visible], float) + rng.normal(0, 2, (len(visible), 4))
        ids = tracker.update(t / 10, boxes, _faces(rng, identities, visible))
        truth.append([(p, frame[p]) for p in visible])
        predicted.append(list(zip(ids, boxes.tolist())))
    s = identity_scores(truth, predicted)
    assert s["idf1"] == 1.0 and s["switches"] == 0 and len(tracker.people) == 2


def test_boxes_alone_swap_where_embeddings_do_not():
    """Without embeddings, a crossing with the rear face hidden is where ids can go wrong; the
    embeddings are what keeps them (the same frames as above, with motion reversed on return)."""
    rng = np.random.default_rng(2)
    identities = np.abs(rng.normal(0, 1, (2, 64)))
    scores = {}
    for embed in (False, True):
        tracker = PeopleTracker()
        truth, predicted = [], []
        for t in range(60):
            # A walks right and stops behind B's path, B walks left then turns back: hidden frames in between
            xa = 20 + 6 * min(t, 30)
            xb = 340 - 6 * t if t < 30 else 160 + 6 * (t - 30)
            frame = {0: [xa, 100, xa + 80, 190], 1: [xb, 100, xb + 80, 190]}
            visible = [p for p in frame if not (25 <= t <= 35 and p == 1)]
            boxes = np.array([frame[p] for p in visible], float)
            ids = tracker.update(t / 10, boxes, _faces(rng, identities, visible) if embed else None)
            truth.append([(p, frame[p]) for p in visible])
            predicted.append(list(zip(ids, boxes.tolist())))
        scores[embed] = identity_scores(truth, predicted)
    assert scores[True]["idf1"] == 1.0
    assert scores[False]["idf1"] < scores[True]["idf1"]


def test_faces_followed_from_the_frame_before_keep_their_person_without_embeddings():
    """The detection prior's way: every 10th frame detected whole (every face embedded), between
    them each face followed from its face of the frame before (``continues``: that face's person)
    and not embedded (a row of nan). Two people meet and turn back where they met: boxes moved on
    by their velocity swap them, the faces' continuations do not; the nan rows count in neither
    the video's mean nor anyone's running embedding."""
    rng = np.random.default_rng(2)
    identities = np.abs(rng.normal(0, 1, (2, 64)))
    scores = {}
    for follow in (False, True):
        tracker = PeopleTracker()
        truth, predicted, last, embedded = [], [], {}, 0
        for t in range(35):
            step = min(t, 28 - t)  # towards each other until they meet at frame 14, then back
            frame = {0: [20 + 12 * step, 100, 100 + 12 * step, 190], 1: [356 - 12 * step, 104, 432 - 12 * step, 188]}
            people = list(frame)
            boxes = np.array([frame[p] for p in people], float)
            continues = [None if t % 10 == 0 else last.get(p) for p in people]
            embeddings = _faces(rng, identities, people)
            embeddings[[c is not None for c in continues]] = np.nan
            embedded += int(np.isfinite(embeddings).all(1).sum())
            ids = tracker.update(t / 10, boxes, embeddings, continues if follow else None)
            last = dict(zip(people, ids))
            truth.append([(p, frame[p]) for p in people])
            predicted.append(list(zip(ids, boxes.tolist())))
        scores[follow] = identity_scores(truth, predicted)
        assert tracker.faces_seen == embedded == 8  # frames 0, 10, 20, 30
        assert np.isfinite(tracker.mean).all() and all(np.isfinite(p.embedding).all() for p in tracker.people)
    assert scores[True]["idf1"] == 1.0 and scores[True]["switches"] == 0
    assert scores[False]["switches"] > 0


def test_a_person_who_leaves_and_returns_gets_their_id_back():
    rng = np.random.default_rng(3)
    identities = np.abs(rng.normal(0, 1, (3, 64)))
    for embed, expected in ((True, 3), (False, 4)):
        tracker = PeopleTracker()
        seen = []
        for t in range(80):
            frame = {0: [10, 10, 90, 100], 1: [200, 10, 280, 100]}
            if 20 <= t < 50:
                del frame[1]  # person 1 out of the frame for 3 s
            else:
                frame[1] = [200 + (60 if t >= 50 else 0), 10, 280 + (60 if t >= 50 else 0), 100]  # back elsewhere
            if t >= 10:
                frame[2] = [400, 20, 470, 100]
            people = list(frame)
            ids = tracker.update(t / 10, np.array([frame[p] for p in people], float),
                                 _faces(rng, identities, people) if embed else None)
            seen.append(dict(zip(people, ids)))
        assert {s[1] for s in seen if 1 in s} == ({1} if embed else {1, 3}), embed
        assert len(tracker.people) == expected


def test_a_known_count_of_people_is_never_exceeded():
    rng = np.random.default_rng(4)
    identities = np.abs(rng.normal(0, 1, (2, 64)))
    tracker = PeopleTracker(TrackerSettings(people=2))
    for t in range(40):
        # person 0 jumps across the frame every 10 frames (a cut): nothing links by place
        x = 10 if (t // 10) % 2 == 0 else 400
        boxes = np.array([[x, 10, x + 80, 100], [200, 10, 280, 100]], float)
        ids = tracker.update(t / 10, boxes, _faces(rng, identities, [0, 1], noise=0.4))
        assert ids == [0, 1], (t, ids)
    assert len(tracker.people) == 2
    # three faces in a frame of a two-person video: the least clear one gets no id
    ids = tracker.update(4.0, np.array([[10, 10, 90, 100], [200, 10, 280, 100], [300, 0, 310, 10]], float),
                         _faces(rng, np.concatenate([identities, identities[:1]]), [0, 1, 2]))
    assert sorted(ids, key=str) == [0, 1, None]
    with pytest.raises(ValueError, match="--people 0"):
        TrackerSettings(people=0)


def test_a_tracker_continues_from_its_state_as_if_never_stopped():
    rng = np.random.default_rng(5)
    identities = np.abs(rng.normal(0, 1, (3, 32)))
    frames = []
    for t in range(50):
        visible = [p for p in range(3) if not (p == 2 and 15 <= t < 35)]
        boxes = np.array([[30 + 100 * p + 2 * t, 20, 100 + 100 * p + 2 * t, 100] for p in visible], float)
        frames.append((t / 10, boxes, _faces(rng, identities, visible)))
    whole = PeopleTracker()
    expected = [whole.update(*f) for f in frames]
    first = PeopleTracker()
    got = [first.update(*f) for f in frames[:25]]
    import json

    resumed = PeopleTracker.from_state(json.loads(json.dumps(first.state())))
    got += [resumed.update(*f) for f in frames[25:]]
    assert got == expected
