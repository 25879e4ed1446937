"""AU signals over time: the streamed smoothing equals the whole-series one, windows in seconds,
zero-phase without delay, hysteresis, events and shares of time by hand, rows kept in order."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_modules.serving.signals import (Curve, PersonSignal, SmoothingSettings, VideoSignals, hann_weights,
                                               hysteresis_decisions, smooth_series)


def _times(rng, n=120, fps=10.0, gaps=((40, 3.0),)):
    """Frame times with jitter and gaps (a person out of sight for a few seconds)."""
    t = np.arange(n) / fps + rng.uniform(0, 0.2 / fps, n)
    for at, length in gaps:
        t[at:] += length
    return t


@pytest.mark.parametrize("mode", ["zero_phase", "causal"])
def test_streamed_smoothing_equals_the_whole_series(mode):
    rng = np.random.default_rng(0)
    t = _times(rng)
    v = rng.uniform(0, 1, (len(t), 3))
    settings = SmoothingSettings(window_s=0.8, mode=mode, hysteresis=0.0)
    signal = PersonSignal(["AU1", "AU2", "AU12"], np.full(3, 0.5), settings)
    got = {}
    for i, (ti, vi) in enumerate(zip(t, v)):
        for key, smoothed, _ in signal.push(ti, vi, i):
            got[key] = smoothed
    for key, smoothed, _ in signal.flush():
        got[key] = smoothed
    assert sorted(got) == list(range(len(t)))
    np.testing.assert_allclose(np.stack([got[i] for i in range(len(t))]), smooth_series(t, v, settings), atol=1e-12)


def test_zero_phase_by_hand_and_across_a_gap():
    # five frames 0.1 s apart, window 0.4 s: frame 2 weighs frames 1, 2, 3 by 0.5, 1, 0.5 (Hann)
    t = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    v = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    out = smooth_series(t, v, SmoothingSettings(window_s=0.4))
    assert out[2] == pytest.approx(1 / 2) and out[1] == pytest.approx(0.5 / 2) and out[0] == pytest.approx(0.0)
    # the same frames with a 2 s gap after frame 2: nothing crosses the gap
    t2 = np.array([0.0, 0.1, 0.2, 2.3, 2.4])
    out2 = smooth_series(t2, v, SmoothingSettings(window_s=0.4, max_gap_s=1.0))
    assert out2[3] == 0.0 and out2[2] == pytest.approx(1 / 1.5)
    assert hann_weights(np.array([0.0]), 0.0).tolist() == [1.0]


def test_window_in_seconds_means_the_same_at_any_frame_rate():
    """A smile from 2 s to 4 s seen at 30 fps and at 10 fps (every third frame): smoothed with the
    same 0.5 s window, both curves agree where both have frames, and the onset is not delayed."""
    def smile(t):
        return np.clip(np.minimum(t - 1.8, 4.2 - t) / 0.4, 0, 1)

    fast = np.arange(0, 6, 1 / 30)
    slow = fast[::3]
    s = SmoothingSettings(window_s=0.5)
    a = smooth_series(fast, smile(fast), s)
    b = smooth_series(slow, smile(slow), s)
    np.testing.assert_allclose(a[::3], b, atol=0.02)
    # zero phase: the smoothed curve crosses 0.5 where the raw one does (2.0 s), not later
    crossing = fast[np.argmax(a >= 0.5)]
    assert abs(crossing - 2.0) <= 1 / 30 + 1e-9
    # causal: it lags
    c = smooth_series(fast, smile(fast), SmoothingSettings(window_s=0.5, mode="causal"))
    assert fast[np.argmax(c >= 0.5)] > 2.1


def test_hysteresis_holds_a_decision_through_flicker():
    p = np.array([0.2, 0.52, 0.45, 0.51, 0.38, 0.53, 0.2, 0.45, 0.2])
    plain = hysteresis_decisions(p[:, None], np.array([0.5]), 0.0)[:, 0]
    held = hysteresis_decisions(p[:, None], np.array([0.5]), 0.2)[:, 0]
    assert plain.tolist() == [False, True, False, True, False, True, False, False, False]
    # on at >= 0.5, off below 0.4: 0.52 turns it on, 0.45 holds it, 0.38 ends it, 0.53 starts another
    assert held.tolist() == [False, True, True, True, False, True, False, False, False]
    # the streamed signal decides the same
    signal = PersonSignal(["AU1"], np.array([0.5]), SmoothingSettings(window_s=0.0, hysteresis=0.2))
    streamed = [bool(on[0]) for k, v in enumerate(p) for _, _, on in signal.push(k / 10, np.array([v]), k)]
    assert streamed == held.tolist()


def test_events_and_shares_of_time_by_hand():
    """One person, AU12 on from 1.0 s to 2.0 s (peak at 1.5 s) and again at 3.0-3.2 s; no smoothing,
    so the events are exactly the raw runs."""
    settings = SmoothingSettings(window_s=0.0, hysteresis=0.0)
    video = VideoSignals(["AU1", "AU12"], np.array([0.5, 0.5]), settings)
    rows_out = []
    for k in range(41):  # 0.0 .. 4.0 s at 10 fps
        t = k / 10
        p12 = 0.9 - abs(t - 1.5) * 0.6 if 1.0 <= t <= 2.0 else (0.7 if 3.0 <= t <= 3.2 else 0.1)
        rows_out += video.add([{"time_s": t, "person": 0, "status": "ok", "AU1_prob": 0.1, "AU12_prob": p12}])
    rows_out += video.finish()
    assert [r["time_s"] for r in rows_out] == [k / 10 for k in range(41)]
    events = video.events()
    assert [(e["au"], e["onset_s"], e["apex_s"], e["offset_s"]) for e in events] == [
        ("AU12", 1.0, 1.5, 2.0), ("AU12", 3.0, 3.0, 3.2)]
    assert events[0]["duration_s"] == pytest.approx(1.0) and events[0]["peak_prob"] == pytest.approx(0.9)
    (summary,) = video.summary()
    # seen 4.0 s; AU12 on over the spans after its on-frames: 1.0-2.1 (1.1 s) and 3.0-3.3 (0.3 s)
    assert summary["seen_s"] == pytest.approx(4.0)
    assert summary["AU12_active_share"] == pytest.approx(1.4 / 4.0) and summary["AU1_active_share"] == 0.0


def test_rows_come_back_in_order_with_smoothed_values_for_faces_of_people():
    rng = np.random.default_rng(2)
    video = VideoSignals(["AU12"], np.array([0.5]), SmoothingSettings(window_s=0.6))
    sent, back = [], []
    for k in range(30):
        t = k / 10
        frame = [{"time_s": t, "person": p, "status": "ok", "AU12_prob": float(rng.uniform())} for p in (0, 1)
                 if not (p == 1 and 10 <= k < 25)]
        if k == 5:
            frame.append({"time_s": t, "person": None, "status": "ok", "AU12_prob": 0.3})  # beyond --people
        if k == 7:
            frame = [{"time_s": t, "person": None, "status": "no_face"}]
        sent += frame
        got = video.add(frame)
        back += got
        assert len(back) >= len(sent) - 2 * 4  # held no more than half a window (0.3 s) of frames
    back += video.finish()
    assert [id(r) for r in back] == [id(r) for r in sent]
    for r in back:
        assert ("AU12_smooth_prob" in r) == (r["status"] == "ok" and r["person"] is not None)
    # each person's column equals the whole-series smoothing of that person's frames
    for p in (0, 1):
        mine = [r for r in back if r.get("person") == p]
        ref = smooth_series([r["time_s"] for r in mine], np.array([[r["AU12_prob"]] for r in mine]),
                            SmoothingSettings(window_s=0.6))
        np.testing.assert_allclose([r["AU12_smooth_prob"] for r in mine], ref[:, 0].round(5), atol=1e-9)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="--smooth_s -1"):
        SmoothingSettings(window_s=-1)
    with pytest.raises(ValueError, match="--hysteresis 1.5"):
        SmoothingSettings(hysteresis=1.5)
    with pytest.raises(ValueError, match="'median'"):
        SmoothingSettings(mode="median")


def test_a_curve_keeps_bounded_points_that_average_what_they_replace():
    curve = Curve(max_points=100)
    t = np.arange(1000) / 10
    for ti in t:
        curve.add(ti, np.array([ti, 1.0]))
    times, values = curve.arrays()
    assert 50 <= len(times) <= 100 and np.all(np.diff(times) > 0)
    np.testing.assert_allclose(values[:, 0], times, atol=1e-9)  # a linear signal: each point its span's mean
    assert sum(curve.counts) == len(t) and np.all(values[:, 1] == 1.0)
    ends = np.cumsum(curve.counts)
    np.testing.assert_allclose(times, [t[e - c:e].mean() for e, c in zip(ends, curve.counts)], atol=1e-9)


def test_the_picture_draws_the_people_seen_longest(tmp_path):
    """A video with 20 people (person p seen for p + 1 frames): the curves for the picture are the
    12 seen longest, in id order, and the picture's height does not grow with the people."""
    from callbacks.plots import au_curves_figure

    video = VideoSignals(["AU12"], np.array([0.5]), SmoothingSettings(window_s=0.0))
    for k in range(20):
        video.add([{"time_s": k / 10, "person": p, "status": "ok", "AU12_prob": 0.2} for p in range(20) if p >= 19 - k])
    video.finish()
    curves = video.curves(most=12)
    assert list(curves) == list(range(8, 20))
    assert len(video.curves()) == 20
    fig = au_curves_figure(curves, [], ["AU12"], np.array([0.5]), "clip", people_total=20)
    assert len(fig.axes) == 12 and "the 12 of 20 people seen longest" in fig._suptitle.get_text()
