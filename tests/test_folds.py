"""Subject-exclusive folds: the published BP4D and DISFA partitions as the papers state them, and
seeded random k-fold; no subject in two folds' test sets or in a fold's train and test, every
labelled frame tested exactly once."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from datamodules.io.folds import PROTOCOLS, FoldError, protocol_folds, random_folds, fold_of_rows


@pytest.mark.parametrize("name, subjects, parts", [("bp4d-3fold", 41, (14, 14, 13)), ("disfa-3fold", 27, (9, 9, 9))])
def test_published_partitions_have_the_subject_counts_papers_state(name, subjects, parts):
    protocol = PROTOCOLS[name]
    assert len(protocol.subjects) == len(set(protocol.subjects)) == subjects
    assert tuple(len(p) for p in protocol.parts) == parts


def test_bp4d_and_disfa_subject_ids_are_the_distributed_ones():
    bp4d = set(PROTOCOLS["bp4d-3fold"].subjects)
    assert bp4d == {f"F{i:03d}" for i in range(1, 24)} | {f"M{i:03d}" for i in range(1, 19)}
    disfa = set(PROTOCOLS["disfa-3fold"].subjects)
    assert disfa == {f"SN{i:03d}" for i in range(1, 33)} - {"SN014", "SN015", "SN019", "SN020", "SN022"}


def test_fold_numbers_follow_the_sources():
    """Fold 1 tests on part 3 (F007 ... F014) and trains on parts 1 and 2; fold 3 tests on part 1."""
    folds = protocol_folds("bp4d-3fold")
    assert [f.number for f in folds] == [1, 2, 3]
    assert folds[0].test[0] == "F007" and folds[0].test[-1] == "F014" and len(folds[0].train) == 28
    assert folds[2].test[0] == "F001" and "F001" not in folds[0].test + folds[1].test
    disfa = protocol_folds("disfa-3fold")
    assert disfa[1].test == ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024")


@pytest.mark.parametrize("folds", [protocol_folds("bp4d-3fold"), protocol_folds("disfa-3fold"),
                                   random_folds([f"S{i}" for i in range(23)], k=5, seed=7)],
                         ids=["bp4d-3fold", "disfa-3fold", "random-5"])
def test_no_subject_in_two_folds_and_every_frame_tested_once(folds):
    subjects = sorted({s for f in folds for s in f.test})
    for fold in folds:
        assert not set(fold.train) & set(fold.test)
        assert set(fold.train) | set(fold.test) == set(subjects)
    assert Counter(s for f in folds for s in f.test) == Counter(subjects)  # each subject tested once
    # frames: a few hundred per subject, shuffled as a manifest would hold them
    rng = random.Random(0)
    rows = [s for s in subjects for _ in range(rng.randint(1, 300))]
    rng.shuffle(rows)
    tested = fold_of_rows(rows, folds)
    assert len(tested) == len(rows)
    for fold in folds:
        frames = [s for s, n in zip(rows, tested) if n == fold.number]
        assert set(frames) == set(fold.test)
        assert not set(frames) & set(fold.train)
    assert sum(Counter(tested).values()) == len(rows)


def test_random_folds_are_seeded_and_balanced():
    subjects = [f"P{i:02d}" for i in range(10)] * 3  # repeated as rows repeat them
    a, b, c = random_folds(subjects, 3, seed=1), random_folds(subjects, 3, seed=1), random_folds(subjects, 3, seed=2)
    assert a == b and a != c
    assert sorted(len(f.test) for f in a) == [3, 3, 4]
    with pytest.raises(FoldError, match="2 subject"):
        random_folds(["A", "B"], 3)
    with pytest.raises(FoldError, match="at least 2"):
        random_folds(subjects, 1)


def test_validation_is_carved_from_training_subjects_only():
    for fold in protocol_folds("bp4d-3fold"):
        train, val = fold.validation(0.2, seed=3)
        assert val and not set(val) & set(fold.test) and not set(val) & set(train)
        assert set(train) | set(val) == set(fold.train)
        assert fold.validation(0.2, seed=3) == (train, val)


def test_a_frame_of_an_unknown_subject_or_overlapping_folds_is_an_error():
    folds = protocol_folds("disfa-3fold")
    with pytest.raises(FoldError, match=r"labels.csv row 3: subject 'SN014' is in no fold's test set"):
        fold_of_rows(["SN001", "SN002", "SN014"], folds, where="labels.csv")
    overlapping = random_folds(["A", "B", "C"], 3)
    overlapping[1] = type(overlapping[1])(2, overlapping[1].train, overlapping[1].test + overlapping[0].test)
    with pytest.raises(FoldError, match="tested in folds 1 and 2"):
        fold_of_rows(["A"], overlapping)
    with pytest.raises(FoldError, match="not one of bp4d-3fold, disfa-3fold"):
        protocol_folds("bp4d-10fold")
