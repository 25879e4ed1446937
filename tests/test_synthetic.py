"""SynthAU: deterministic, EmotioNet-like statistics, every AU visible, written atomically."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from datamodules.synthau import generate
from datamodules.io.manifest import EMOTIONET_AUS, UNLABELLED, read_levels, read_manifest
from datamodules.synthau.generate import SynthAUSettings, generate_synthau
from datamodules.synthau.face import FaceSpec, render_face, sample_identity
from datamodules.synthau.labels import EXPRESSIONS, sample_aus, sample_labels
from datamodules.synthau.layouts import facs_level

FRONT_LIGHT = np.array([0.0, 0.0, 1.0])


def _render(intensity: dict[int, float], seed: int = 5) -> np.ndarray:
    ident = sample_identity(np.random.default_rng(seed))
    face, alpha, _ = render_face(FaceSpec(ident, intensity), 192, FRONT_LIGHT, 0.5, np.random.default_rng(0))
    return face.astype(np.float32)


def test_manifests_are_emotionet_form(synthau):
    k = len(EMOTIONET_AUS)
    for split, n in (("train", 96), ("val", 12), ("test", 12)):
        header = (synthau / f"{split}.tsv").read_text().splitlines()[0].split("\t")
        assert header[0] == "image" and header[k + 1:k + 3] == ["identity", "expression"]
        assert header[1:k + 1] == [f"AU{a}" for a in EMOTIONET_AUS]
        assert header[k + 3:] == [f"AU{a}_intensity" for a in EMOTIONET_AUS]  # appended: the rest keep their places
        m = read_manifest(synthau / f"{split}.tsv", check_images=True)
        assert len(m) == n and not m.skipped
    assert (synthau / "contact_sheet.png").stat().st_size > 10_000
    assert (synthau / "au_gallery.png").stat().st_size > 10_000


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_workers(tmp_path, synthau):
    settings = SynthAUSettings(num_images=120, seed=3)
    generate_synthau(tmp_path / "one", settings, workers=1)
    def files(root):  # every manifest and image, by path
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.suffix in (".tsv", ".jpg")}

    two, one = files(synthau), files(tmp_path / "one")
    assert len(two) == 120 + 3 and one == two


@pytest.mark.slow
def test_other_seed_other_data(tmp_path, synthau):
    generate_synthau(tmp_path / "s4", SynthAUSettings(num_images=20, seed=4), workers=1)
    assert (tmp_path / "s4" / "train.tsv").read_text() != (synthau / "train.tsv").read_text()


@pytest.mark.slow
def test_label_statistics_like_emotionet():
    """Label draws alone (no rendering) for 20k faces: rare and common AUs, 5-15 % unlabelled."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(20_000):
        _, intensity, _ = sample_aus(rng)
        rows.append(sample_labels(rng, intensity, EMOTIONET_AUS))
    y = np.array(rows)
    labelled = y != UNLABELLED
    rate = (y == 1).sum(0) / labelled.sum(0)
    assert (rate < 0.05).sum() >= 10, dict(zip(EMOTIONET_AUS, rate.round(3)))
    assert (rate > 0.20).sum() >= 2, dict(zip(EMOTIONET_AUS, rate.round(3)))
    assert 0.05 <= 1 - labelled.mean() <= 0.15
    assert rate.min() > 0.005  # every AU occurs: none is unlearnable


def test_intensities_agree_with_labels_and_truth(synthau, truth):
    """Every row's level is the FACS level of the intensity drawn for its face (faces.jsonl), 999
    exactly where the occurrence label is, at least 1 where it is 1 and 0 where it is 0."""
    seen = set()
    for split in ("train", "val", "test"):
        m = read_manifest(synthau / f"{split}.tsv")
        levels, known = read_levels(m)
        raw = np.array([line.split("\t")[1:24] for line in (synthau / f"{split}.tsv").read_text().splitlines()[1:]],
                       int)
        np.testing.assert_array_equal(known, m.mask)
        assert (levels[m.labels == 1] >= 1).all() and (levels[(m.labels == 0) & m.mask] == 0).all()
        assert (levels[~known] == 0).all() and (raw[~known] == UNLABELLED).all()
        for i, image in enumerate(m.images):
            drawn = {int(au): v for au, v in truth[image]["intensity"].items()}
            assert truth[image]["labels"] == raw[i].tolist()
            want = [facs_level(drawn[a]) if a in drawn else 0 for a in EMOTIONET_AUS]
            np.testing.assert_array_equal(levels[i][known[i]], np.array(want)[known[i]], err_msg=image)
            assert [int(m.extra[f"AU{a}_intensity"][i]) for a, k in zip(EMOTIONET_AUS, known[i]) if not k] == \
                [UNLABELLED] * int((~known[i]).sum())
            seen |= set(levels[i][known[i]].tolist())
    assert {0, 4, 5} <= seen  # the renderer draws active AUs at 0.65-1.0: levels D and E


def test_a_folder_of_another_version_is_generated_again(tmp_path, synthau):
    """The manifests changed with the version, so a folder written before is not taken as complete."""
    settings = SynthAUSettings(num_images=120, seed=3)
    assert generate.synthau_is_complete(synthau, settings)
    old = tmp_path / "old"
    old.mkdir()
    marker = json.loads((synthau / "synthau.json").read_text())
    marker["settings"]["version"] = generate.SYNTHAU_VERSION - 1
    (old / "synthau.json").write_text(json.dumps(marker))
    assert not generate.synthau_is_complete(old, settings)


def test_summary_counts(synthau):
    import json

    s = json.loads((synthau / "synthau.json").read_text())
    assert s["counts"] == {"train": 96, "val": 12, "test": 12}
    assert s["identities"] > 50  # 120 identities drawn for 120 scenes
    assert set(EXPRESSIONS) >= set(s["expressions"])


def test_identities_and_expressions_at_scale():
    settings = SynthAUSettings()
    identities = generate._identities(settings)
    assert len({(i.skin, i.hair) for i in identities}) > 50  # people look different, not 120 copies
    rng = np.random.default_rng(1)
    assert {sample_aus(rng)[0] for _ in range(2000)} == set(EXPRESSIONS)


@pytest.mark.parametrize("au", EMOTIONET_AUS)
@pytest.mark.parametrize("identity", [5, 7, 11])  # darker and lighter skin, dark and grey hair
def test_every_au_changes_the_face(au, identity):
    """Each AU alone changes a visible patch: >15 grey levels on at least 0.15 % of the canvas (55 px)."""
    neutral, active = _render({}, identity), _render({au: 1.0}, identity)
    changed = (np.abs(active - neutral).max(-1) > 15).mean()
    assert changed > 0.0015, f"AU{au} changes only {100 * changed:.2f}% of the pixels"


def test_au_moves_the_right_region():
    """Brow AUs change the upper face, mouth AUs the lower face (canvas rows above/below the nose)."""
    neutral = _render({})
    for au, upper in ((1, True), (2, True), (4, True), (12, False), (15, False), (25, False)):
        diff = np.abs(_render({au: 1.0}) - neutral).max(-1)
        top, bottom = diff[:96].sum(), diff[96:].sum()
        assert (top > bottom) == upper, f"AU{au}: top {top:.0f}, bottom {bottom:.0f}"


def test_interrupted_generation_leaves_nothing_complete(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = generate._render_chunk

    def failing(args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed mid-way
        return real(args)

    monkeypatch.setattr(generate, "_render_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_synthau(tmp_path / "d", SynthAUSettings(num_images=16), workers=1)
    assert not (tmp_path / "d").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too
