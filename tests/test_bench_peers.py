"""bench/peers.py: every method runs a tiny configuration at equal forward passes and lands in the table."""
import importlib.util
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import peers  # noqa: E402

HAVE_EVOTORCH = importlib.util.find_spec("evotorch") is not None
TINY = ["--seeds", "0,1", "--generations", "6", "--population-size", "10", "--eval-every", "2", "--n-train", "128",
        "--n-test", "128"]


def test_tiny_run_of_every_method(tmp_path):
    methods = peers.METHODS if HAVE_EVOTORCH else peers.RUNGS
    out = tmp_path / "peers"
    r = peers.main(TINY + ["--methods", ",".join(methods), "--out", str(out)])
    # equal budgets: 6 generations x 10 = 60 forward passes for every method and seed (EvoTorch's are counted calls)
    for m in methods:
        for curve in r["results"][m].values():
            assert [n for n, _ in curve] == [0, 20, 40, 60], (m, curve)
            assert all(0.0 <= acc <= 1.0 for _, acc in curve)
        assert r["summary"][m]["forward_passes"] == 60
    table = (tmp_path / "peers.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert set(saved["summary"]) == set(methods) and os.path.getsize(tmp_path / "peers.png") > 0
    # the rungs' curves start from the same initial weights and data: one initial accuracy per seed
    for s in ("0", "1"):
        assert len({saved["curves"][m][s][0][1] for m in methods}) == 1


@pytest.mark.skipif(not HAVE_EVOTORCH, reason="evotorch not installed (pip install -r requirements-bench.txt)")
def test_library_methods_learn_and_sigma_adaptation_is_what_differs(tmp_path):
    args = peers.parse_args(["--generations", "40", "--eval-every", "40", "--n-train", "256", "--n-test", "256"])
    curves = {m: peers.run_library(m, args, seed=0) for m in ("snes", "pgpe", "pgpe_fixed_sigma")}
    for m, c in curves.items():
        assert c[-1][0] == 40 * 50 and c[-1][1] > c[0][1] + 0.15, (m, c)
    assert curves["pgpe"] != curves["pgpe_fixed_sigma"]


def test_summary_counts_unreached_seeds_and_means_only_over_reached():
    results = {"a": {0: [(0, 0.3), (50, 0.91), (100, 0.95)], 1: [(0, 0.3), (50, 0.5), (100, 0.8)],
                     2: [(0, 0.3), (50, 0.6), (100, 0.92)]}}
    s = peers.summarise(results, ["a"])["a"]
    assert s["reached"] == [50, None, 100] and s["reached_count"] == 2 and s["reached_mean"] == 75.0
    assert abs(s["final_mean"] - (0.95 + 0.8 + 0.92) / 3) < 1e-12 and s["forward_passes"] == 100
    # sample std (ddof 1): reached [50, 100] -> 35.4; finals deviate [0.06, -0.09, 0.03] from 0.89 -> sqrt(0.0126 / 2)
    assert "| a | 75 ± 35 | 2/3 | 89.0% ± 7.9 | 100 |" in peers.table(peers.summarise(results, ["a"]))


@pytest.mark.parametrize("flags", [["--methods", "cma"], ["--seeds", "x"], ["--population-size", "7"],
                                   ["--adam-lr", "0"]])
def test_bad_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit):
        peers.parse_args(flags)
    assert "must" in capsys.readouterr().err
