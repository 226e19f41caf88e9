"""bench/seeds.py: the promise a rung's default makes over seeds, computed from the runs it read."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import seeds  # noqa: E402


def runs(label, dtype, gains):
    return [{"label": label, "dtype": dtype, "seed": 3 + k, "gain": g, "minutes": 2.0 + k} for k, g in enumerate(gains)]


def test_seed_lists_and_ranges():
    assert seeds.parse_seeds("3-9") == [3, 4, 5, 6, 7, 8, 9]
    assert seeds.parse_seeds("0,2,5-6") == [0, 2, 5, 6]


def test_the_promise_is_every_run_improving_and_the_mean_at_least_twice_the_sample_std():
    kept = [30.0, 40.0, 50.0]  # mean 40, std (ddof 1) 10: 40 >= 20
    wide = [5.0, 40.0, 90.0]  # all improve, mean 45 < 2 x 42.7
    one_worse = [60.0, 70.0, -1.0]
    table = {(t["label"], t["dtype"]): t for t in seeds.summarize(
        runs("a", "float32", kept) + runs("b", "float32", wide) + runs("c", "bfloat16", one_worse)
        + runs("d", "float32", [10.0, 20.0]))}
    a, b, c, d = table["a", "float32"], table["b", "float32"], table["c", "bfloat16"], table["d", "float32"]
    assert (a["mean"], a["std"], a["kept"]) == (40.0, 10.0, True)
    assert np.isclose(b["std"], np.std(wide, ddof=1)) and b["improved"] == 3 and b["kept"] is False
    assert (c["worst"], c["worst_seed"], c["improved"], c["kept"]) == (-1.0, 5, 2, False)
    assert d["kept"] is None  # two runs say nothing about a spread
    assert a["minutes"] == 3.0 and a["seeds"] == [3, 4, 5]


def test_report_says_yes_no_and_not_applicable(tmp_path):
    text = seeds.report(seeds.summarize(runs("a", "float32", [30.0, 40.0, 50.0]) + runs("b", "float32", [5.0, 40.0, 90.0])
                                        + runs("d", "float32", [10.0])), tmp_path)
    rows = text.splitlines()[2:]
    assert "| yes |" in rows[0] and "+40.0 +- 10.0" in rows[0]
    assert "| no |" in rows[1]
    assert "n/a (< 3 runs)" in rows[2]
    assert (tmp_path / "summary.md").read_text().strip() == text
