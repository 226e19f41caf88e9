"""bench/estimator_quality.py: the formula it prints matches the estimates, and a tiny run writes its report."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import estimator_quality as eq  # noqa: E402


@pytest.mark.parametrize("mirrored,directions", [(False, 199), (True, 100)])
def test_cosine_formula_matches_the_quadratic_estimates_at_small_sigma(mirrored, directions):
    # the chunked cell must give the same mean cosine as sqrt(P / (P + d + 1)) for P Gaussian directions
    _, cos = eq.quadratic_cell(mirrored, dim=400, evaluations=200, sigma=0.1, trials=60, seed=0)
    assert abs(cos / eq.formula_cosine(directions, 400) - 1) < 0.05, cos


def test_tiny_run_writes_three_tables(tmp_path):
    out = tmp_path / "report.md"
    r = eq.main(["--seeds", "1", "--quad-sigmas", "0.1,3", "--quad-trials", "20", "--toy-sigmas", "0.1",
                 "--toy-generations", "0,2", "--toy-trials", "2", "--dims", "10,1000", "--populations", "20",
                 "--dim-trials", "4", "--out", str(out)])
    text = out.read_text()
    assert text.count("### ") == 3 and "vanilla / mirrored" in text and "formula (P = N / 2)" in text
    assert len(r["toy"]) == 2 and all(-1 <= row[m] <= 1 for row in r["toy"] for m in ("vanilla", "mirrored"))


@pytest.mark.parametrize("flags", [["--populations", "7"], ["--quad-sigmas", "0"], ["--dims", "a"], ["--seeds", "0"]])
def test_bad_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit):
        eq.parse_args(flags)
    assert "must" in capsys.readouterr().err
