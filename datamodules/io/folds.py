"""Subject-exclusive folds: the published 3-fold partitions of BP4D and DISFA, and seeded random k-fold.

AU detection is scored across people: a fold's test subjects are never seen in training, or
frames of one person (thousands per video, nearly alike) leak between train and test and F1
rises for the wrong reason. The field compares methods on one fixed split per data set:

* ``bp4d-3fold``: BP4D's 41 subjects in three parts of 14, 14 and 13;
* ``disfa-3fold``: DISFA's 27 subjects in three parts of 9.

The parts are those of ME-GraphAU (``BP4D_Sequence_split``, ``tool/*_image_label_process.py``),
JAA-Net (``data/list/*_part{1,2,3}_path.txt``), LibreFace (``create_csv.py``, DISFA) and the DRML
authors (quoted in wiibrew/EAC-Net#6), which agree; EAC-Net's own released lists differ. Fold 1
tests on part 3 and trains on parts 1 and 2, fold 2 tests on part 2, fold 3 on part 1; a result
is the mean over the three folds (ZhiwenShao/PyTorch-JAANet#15).

One split is not a result either (repeated random 3-fold splits of BP4D+ move mean F1 by about
0.065): :func:`random_folds` makes seeded subject-exclusive folds of any list of subjects, to be
repeated with other seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence


class FoldError(ValueError):
    """A protocol, subject list or fold assignment that cannot be used; the message says which."""


@dataclass(frozen=True)
class Protocol:
    """A published partition of a data set's subjects into parts, and where it comes from."""

    name: str
    parts: tuple[tuple[str, ...], ...]
    source: str

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(s for part in self.parts for s in part)


@dataclass(frozen=True)
class Fold:
    """One fold: its number (from 1), the subjects it trains on and those it tests on."""

    number: int
    train: tuple[str, ...]
    test: tuple[str, ...]

    def validation(self, fraction: float = 0.2, seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(train, validation)``: the fold's training subjects with a seeded ``fraction`` of them
        (at least one) held out for validation, never a test subject."""
        if not 0 < fraction < 1:
            raise FoldError(f"validation fraction must be between 0 and 1, got {fraction}")
        if len(self.train) < 2:
            raise FoldError(f"fold {self.number}: {len(self.train)} training subject(s); at least 2 are needed "
                            "to hold some out for validation")
        order = sorted(self.train)
        random.Random(seed).shuffle(order)
        held = set(order[:max(1, round(fraction * len(order)))])
        return tuple(s for s in self.train if s not in held), tuple(s for s in self.train if s in held)


_SOURCE = ("ME-GraphAU BP4D_Sequence_split and tool/*_image_label_process.py; JAA-Net data/list/*_part{1,2,3}_path.txt; "
           "LibreFace create_csv.py (DISFA); DRML folds quoted in wiibrew/EAC-Net#6")

PROTOCOLS: dict[str, Protocol] = {
    "bp4d-3fold": Protocol("bp4d-3fold", (
        ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016", "M014", "F023", "M008"),
        ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020", "F011", "M013", "M005"),
        ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017", "M015", "F014"),
    ), _SOURCE),
    "disfa-3fold": Protocol("disfa-3fold", (
        ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
        ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
        ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
    ), _SOURCE),
}
# Fold n tests on this part (0-based) and trains on the others, as the sources number them.
TEST_PART = {1: 2, 2: 1, 3: 0}


def protocol_folds(name: str) -> list[Fold]:
    """The three folds of a published protocol (:data:`PROTOCOLS`)."""
    protocol = PROTOCOLS.get(name)
    if protocol is None:
        raise FoldError(f"protocol {name!r}: not one of {', '.join(PROTOCOLS)} (or use random k-fold)")
    folds = []
    for number, test_part in TEST_PART.items():
        train = tuple(s for i, part in enumerate(protocol.parts) if i != test_part for s in part)
        folds.append(Fold(number, train, protocol.parts[test_part]))
    return folds


def random_folds(subjects: Iterable[str], k: int = 3, seed: int = 0) -> list[Fold]:
    """``k`` subject-exclusive folds of the distinct ``subjects``, shuffled with ``seed``: each
    subject is tested in exactly one fold; test sets differ in size by at most one subject."""
    distinct = sorted(set(subjects))
    if k < 2:
        raise FoldError(f"k must be at least 2, got {k}")
    if len(distinct) < k:
        raise FoldError(f"{len(distinct)} subject(s) cannot make {k} subject-exclusive folds")
    random.Random(seed).shuffle(distinct)
    parts = [tuple(distinct[i::k]) for i in range(k)]
    return [Fold(i + 1, tuple(s for j, part in enumerate(parts) if j != i for s in part), parts[i]) for i in range(k)]


def fold_of_rows(subjects: Sequence[str], folds: Sequence[Fold], where: str = "manifest") -> list[int]:
    """For each row's subject, the number of the fold that tests it. A subject no fold tests, or
    one that two folds test, is a :class:`FoldError` naming it and the first row (from 1) that has
    it: a frame is never silently dropped or scored twice."""
    tested: dict[str, int] = {}
    for fold in folds:
        for s in fold.test:
            if s in tested:
                raise FoldError(f"subject {s} is tested in folds {tested[s]} and {fold.number}")
            tested[s] = fold.number
        if set(fold.train) & set(fold.test):
            raise FoldError(f"fold {fold.number}: subjects both trained and tested on: "
                            f"{', '.join(sorted(set(fold.train) & set(fold.test)))}")
    numbers = []
    for row, s in enumerate(subjects, start=1):
        if s not in tested:
            raise FoldError(f"{where} row {row}: subject {s!r} is in no fold's test set "
                            f"(folds test {', '.join(sorted(tested))})")
        numbers.append(tested[s])
    return numbers
