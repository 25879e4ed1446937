"""The benchmarks' side-by-side table: medians and ratios to the baseline, by hand."""

from __future__ import annotations

from benchmarks.compare import alternate, print_table


def test_variants_alternate_and_ratios_use_medians(capsys):
    calls = []
    speeds = {"base": iter([10.0, 30.0, 20.0]), "ours": iter([50.0, 80.0, 90.0])}

    def variant(name):
        def run():
            calls.append(name)
            return next(speeds[name]), 7
        return run

    results = alternate({"base": variant("base"), "ours": variant("ours")}, repeats=3)
    assert calls == ["base", "ours"] * 3  # in turn, so a slow spell hits both
    print_table(results, "images/s", "faces", "d")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| pipeline | images/s (median) | faces | vs baseline |"
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["base", "20.0", "7", "1.00x"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["ours", "80.0", "7", "4.00x"]
