"""People across the frames of a video: a person id per face, stable while people move, cross
each other, turn, leave the frame and come back; and the MOT measures of such ids against truth.

:class:`PeopleTracker` takes a video's frames in order, each with its faces' boxes and, when the
network gives them, identity embeddings (:meth:`lightning_modules.au_detector.AUNet.embedding`:
the face branch's features, pretrained to tell identities apart with an ArcFace margin). Each
frame's faces are assigned to the people seen so far in one optimal assignment
(``scipy.optimize.linear_sum_assignment``) over two kinds of evidence:

- **where**: the overlap (IoU) of the face's box with where the person is expected, their last
  box moved on by their recent velocity, for people seen in the last ``link_s`` seconds;
- **who**: the cosine similarity of the face's embedding with the person's running mean
  embedding. Both are first centred on the mean embedding of the video's faces: pooled ReLU
  features all point into one orthant, so raw cosines between any two faces are high, while the
  centred ones are near 0 for different people and near 1 for the same one.

A face where a person is expected continues that person (the embedding only ranks candidates
there, unless ``link_similarity`` is raised above -1 to let it veto: a weak embedding then breaks
tracks more often than it saves them); a face away from everyone's expected place is re-identified by its
embedding alone, at a stricter ``reid_similarity`` (after leaving the frame, or being lost);
otherwise it is a new person. Position and identity together outrank identity alone, so a face
is not taken from the person standing there by someone similar who left. With ``people`` known,
no more people than that are made: a face that matches no one goes to the most similar person
not in the frame. Without embeddings (the ONNX backend answers AUs only) people are followed by
their boxes alone and a person lost for longer than ``link_s`` comes back with a new id.

A face the detection prior followed from the frame before (``continues``: the person of the face
it was found around) is that person's before any overlap or likeness is weighed; such faces
are usually not embedded (a row of nan), which counts in neither the mean nor anyone's embedding.

Ids count from 0 in the order people first appear, per video; the tracker's whole state is
:meth:`PeopleTracker.state` (a dict of lists), so a run stopped midway continues with the same ids.

:func:`identity_scores` measures ids against ground truth as the MOT benchmarks do: IDF1 (Ristani
et al. 2016: the share of detections that keep the identity of a one-to-one matching of true and
predicted people over the whole video) and identity switches (CLEAR MOT: a true person matched,
frame by frame, to another id than the last one it had).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

# An assignment's score where it is not allowed (scores lie in [-1, 2]).
FORBIDDEN = -1e6
# Below this norm a centred embedding says nothing (one face seen so far: it is the mean itself).
MIN_CENTRED_NORM = 1e-3
# The video's mean face is too unsteady to centre on before this many faces: boxes alone decide.
MIN_FACES_TO_CENTRE = 10


@dataclass(frozen=True)
class TrackerSettings:
    """How faces are linked into people (see the module's docstring).

    Args:
        link_s: a person not seen for longer is no longer expected anywhere: only their embedding
            can bring them back.
        min_iou: the least overlap with a person's expected box that counts as "where they are".
        link_similarity: where a face is where a person is expected, the least centred cosine
            similarity that still lets it continue them (-1: the boxes' say).
        reid_similarity: the least centred cosine similarity that re-identifies a face away from
            everyone's expected place.
        momentum: weight of a person's running embedding against the new face's.
        people: how many people the video holds, when known: never more ids than that.
    """

    link_s: float = 1.0
    min_iou: float = 0.2
    link_similarity: float = -1.0
    reid_similarity: float = 0.4
    momentum: float = 0.9
    people: int | None = None

    def __post_init__(self):
        if self.link_s < 0 or not 0 <= self.min_iou <= 1 or not 0 <= self.momentum < 1:
            raise ValueError(f"tracker settings out of range: {self}")
        if self.people is not None and self.people < 1:
            raise ValueError(f"--people {self.people}: expected a positive count of people")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N,4) with every box of ``b`` (M,4), x0 y0 x1 y1 -> (N,M).

    >>> box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [0, 0, 2, 2]])).round(3).tolist()
    [[0.143, 1.0]]
    """
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class Person:
    """What the tracker knows of one person: where and when last seen, how fast the box moved
    (px per second), and their running identity embedding (None without embeddings)."""

    id: int
    box: np.ndarray
    seen_s: float
    velocity: np.ndarray
    embedding: np.ndarray | None

    def expected_box(self, time_s: float) -> np.ndarray:
        return self.box + self.velocity * (time_s - self.seen_s)


class PeopleTracker:
    """Person ids for the faces of one video's frames, given in order (see the module's docstring)."""

    def __init__(self, settings: TrackerSettings = TrackerSettings()):
        self.settings = settings
        self.people: list[Person] = []
        self.mean: np.ndarray | None = None  # running mean of the video's face embeddings
        self.faces_seen = 0

    # -- the public step -----------------------------------------------------------------------
    def update(self, time_s: float, boxes: np.ndarray, embeddings: np.ndarray | None = None,
               continues: Sequence[int | None] | None = None) -> list[int | None]:
        """The person id of each face of the frame at ``time_s`` (boxes (N,4), embeddings (N,D)
        or None, a row of nan for a face not embedded); ``continues``: per face, the person whose
        face of the frame before it was followed from (the detection prior), or None. None only
        for a face beyond the ``people`` count in a frame holding more faces."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if embeddings is not None:
            embeddings = np.asarray(embeddings, np.float64).reshape(len(boxes), -1)
            self._add_to_mean(embeddings[np.isfinite(embeddings).all(1)])
        score = self._scores(time_s, boxes, embeddings)
        for r, pid in enumerate(continues or []):
            if pid is not None and 0 <= pid < len(self.people):
                # the face was found around this person's face of the frame before: theirs,
                # before anyone's overlap or likeness (those stay below 2)
                score[r, pid] = 2.0 + max(score[r, pid], 0.0)
        ids: list[int | None] = [None] * len(boxes)
        if score.size:
            rows, cols = linear_sum_assignment(-score)
            for r, c in zip(rows, cols):
                if score[r, c] > FORBIDDEN / 2:
                    ids[r] = self.people[c].id
        taken = {i for i in ids if i is not None}
        for r in np.argsort(-self._box_areas(boxes)):  # larger (nearer, clearer) faces first
            if ids[r] is None:
                ids[r] = self._new_or_nearest(r, taken, embeddings)
                if ids[r] is not None:
                    taken.add(ids[r])
        for r, pid in enumerate(ids):
            if pid is not None:
                self._saw(pid, time_s, boxes[r], None if embeddings is None else embeddings[r])
        return ids

    # -- evidence ------------------------------------------------------------------------------
    def _centred(self, e: np.ndarray) -> np.ndarray | None:
        """``e`` minus the video's mean face, as a unit vector (rows); None where it says nothing."""
        if self.mean is None or self.faces_seen < MIN_FACES_TO_CENTRE:
            return None
        c = np.atleast_2d(e) - self.mean
        norm = np.linalg.norm(c, axis=1, keepdims=True)
        return np.where(norm > MIN_CENTRED_NORM, c / np.maximum(norm, 1e-12), np.nan)

    def _similarity(self, embeddings: np.ndarray | None) -> np.ndarray | None:
        """Centred cosine similarity of each face with each person (N,P); nan where unknown."""
        if embeddings is None or not self.people:
            return None
        known = [p.embedding is not None for p in self.people]
        if not any(known):
            return None
        faces = self._centred(embeddings)
        if faces is None:
            return None
        people = np.full((len(self.people), embeddings.shape[1]), np.nan)
        idx = [i for i, k in enumerate(known) if k]
        people[idx] = self._centred(np.stack([self.people[i].embedding for i in idx]))
        return faces @ people.T

    def _scores(self, time_s: float, boxes: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        """Score of giving face i to person j (N,P): IoU with the expected box plus similarity
        where the person is expected there, half the similarity for re-identification alone,
        :data:`FORBIDDEN` where neither holds."""
        s = self.settings
        score = np.full((len(boxes), len(self.people)), FORBIDDEN)
        if not self.people or not len(boxes):
            return score
        recent = np.array([time_s - p.seen_s <= s.link_s for p in self.people])
        expected = np.stack([p.expected_box(time_s) for p in self.people])
        iou = box_iou(boxes, expected) * recent[None, :]
        sim = self._similarity(embeddings)
        if sim is None:
            sim = np.full(score.shape, np.nan)
        known = np.isfinite(sim)
        near = iou >= s.min_iou
        link = near & (~known | (sim >= s.link_similarity))
        score[link] = iou[link] + np.where(known, sim, 0.0)[link]
        reid = ~link & known & (sim >= s.reid_similarity)
        score[reid] = 0.5 * sim[reid]
        return score

    # -- new people, and the known count -------------------------------------------------------
    def _new_or_nearest(self, r: int, taken: set[int], embeddings: np.ndarray | None) -> int | None:
        s = self.settings
        if s.people is None or len(self.people) < s.people:
            pid = len(self.people)
            self.people.append(Person(pid, np.zeros(4), -np.inf, np.zeros(4), None))
            return pid
        free = [p for p in self.people if p.id not in taken]
        if not free:
            return None  # more faces in this frame than people in the video
        sim = self._similarity(None if embeddings is None else embeddings[r:r + 1])
        if sim is not None:
            values = {p.id: sim[0, self.people.index(p)] for p in free}
            known = {k: v for k, v in values.items() if np.isfinite(v)}
            if known:
                return max(known, key=known.get)
        return max(free, key=lambda p: p.seen_s).id  # the one seen last

    # -- what is learnt from a face ------------------------------------------------------------
    def _saw(self, pid: int, time_s: float, box: np.ndarray, embedding: np.ndarray | None) -> None:
        person = self.people[pid]
        dt = time_s - person.seen_s
        if np.isfinite(person.seen_s) and 0 < dt <= self.settings.link_s:
            # velocity smoothed over frames: a detector's box jitters by a few px each frame
            person.velocity = 0.5 * person.velocity + 0.5 * (box - person.box) / dt
        else:
            person.velocity = np.zeros(4)
        person.box, person.seen_s = box.copy(), time_s
        if embedding is not None and np.isfinite(embedding).all():
            m = self.settings.momentum
            person.embedding = embedding.copy() if person.embedding is None else m * person.embedding + (1 - m) * embedding

    def _add_to_mean(self, embeddings: np.ndarray) -> None:
        n = len(embeddings)
        if not n:
            return
        total = self.faces_seen + n
        batch = embeddings.mean(0)
        self.mean = batch if self.mean is None else self.mean + (batch - self.mean) * (n / total)
        self.faces_seen = total

    @staticmethod
    def _box_areas(boxes: np.ndarray) -> np.ndarray:
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    # -- resuming ------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything the tracker knows, as JSON-ready lists: :meth:`from_state` continues from it."""
        return {"settings": asdict(self.settings), "faces_seen": self.faces_seen,
                "mean": None if self.mean is None else self.mean.tolist(),
                "people": [{"id": p.id, "box": p.box.tolist(), "seen_s": p.seen_s if np.isfinite(p.seen_s) else None,
                            "velocity": p.velocity.tolist(),
                            "embedding": None if p.embedding is None else p.embedding.tolist()} for p in self.people]}

    @classmethod
    def from_state(cls, state: dict) -> "PeopleTracker":
        tracker = cls(TrackerSettings(**state["settings"]))
        tracker.faces_seen = int(state["faces_seen"])
        tracker.mean = None if state["mean"] is None else np.asarray(state["mean"], np.float64)
        for p in state["people"]:
            tracker.people.append(Person(int(p["id"]), np.asarray(p["box"], np.float64),
                                         -np.inf if p["seen_s"] is None else float(p["seen_s"]),
                                         np.asarray(p["velocity"], np.float64),
                                         None if p["embedding"] is None else np.asarray(p["embedding"], np.float64)))
        return tracker


# -- measures ------------------------------------------------------------------------------------

def identity_scores(truth: Sequence[Sequence[tuple[int, Sequence[float]]]],
                    predicted: Sequence[Sequence[tuple[int, Sequence[float]]]], min_iou: float = 0.5) -> dict:
    """IDF1, IDP, IDR and identity switches of ``predicted`` against ``truth``: per frame, the
    (id, box) of each true and each predicted face; a true and a predicted face match in a frame
    when their IoU is at least ``min_iou``.

    IDF1 = 2 IDTP / (true faces + predicted faces), where IDTP is the most frames of matches that
    a one-to-one pairing of true and predicted ids over the whole video keeps (an optimal
    assignment). Switches follow CLEAR MOT: frame by frame, a true face keeps the predicted face
    of its last match when they still match, the rest are matched by IoU (optimal assignment), and
    a switch is counted when a true id is matched to another predicted id than its last one.
    """
    if len(truth) != len(predicted):
        raise ValueError(f"identity_scores: {len(truth)} frames of truth, {len(predicted)} predicted")
    pairs: dict[tuple[int, int], int] = {}
    n_true = n_pred = switches = matches = 0
    last: dict[int, int] = {}  # true id -> predicted id of its last match
    for gt, pr in zip(truth, predicted):
        n_true, n_pred = n_true + len(gt), n_pred + len(pr)
        if not gt or not pr:
            continue
        iou = box_iou(np.array([b for _, b in gt]), np.array([b for _, b in pr]))
        ok = iou >= min_iou
        for i, j in zip(*np.nonzero(ok)):
            key = (gt[i][0], pr[j][0])
            pairs[key] = pairs.get(key, 0) + 1
        # CLEAR MOT: last frame's correspondences first, where they still hold
        gt_ids, pr_ids = [g for g, _ in gt], [p for p, _ in pr]
        fixed: dict[int, int] = {}
        for i, g in enumerate(gt_ids):
            if g in last and last[g] in pr_ids:
                j = pr_ids.index(last[g])
                if ok[i, j] and j not in fixed.values():
                    fixed[i] = j
        rest_i = [i for i in range(len(gt)) if i not in fixed]
        rest_j = [j for j in range(len(pr)) if j not in fixed.values()]
        if rest_i and rest_j:
            cost = np.where(ok[np.ix_(rest_i, rest_j)], 1 - iou[np.ix_(rest_i, rest_j)], 1e6)
            for a, b in zip(*linear_sum_assignment(cost)):
                if cost[a, b] < 1e6:
                    fixed[rest_i[a]] = rest_j[b]
        for i, j in fixed.items():
            g, p = gt_ids[i], pr_ids[j]
            if g in last and last[g] != p:
                switches += 1
            last[g] = p
            matches += 1
    idtp = 0
    if pairs:
        gts = sorted({g for g, _ in pairs})
        prs = sorted({p for _, p in pairs})
        counts = np.zeros((len(gts), len(prs)))
        for (g, p), n in pairs.items():
            counts[gts.index(g), prs.index(p)] = n
        rows, cols = linear_sum_assignment(-counts)
        idtp = int(counts[rows, cols].sum())
    total = n_true + n_pred
    return {"idf1": 2 * idtp / total if total else float("nan"),
            "idp": idtp / n_pred if n_pred else float("nan"), "idr": idtp / n_true if n_true else float("nan"),
            "idtp": idtp, "switches": switches, "matches": matches, "true_faces": n_true, "predicted_faces": n_pred}
