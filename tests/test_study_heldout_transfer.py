"""studies/heldout_transfer.py: each pair's members really are theta +- sigma*eps of the rung's noise,
its differences and correlations are computed from what the members answered, and the engine is
left as it was."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies"))
import heldout_transfer as bench  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_pairs_and_summary_follow_from_the_members_answers(tmp_path):
    model = build_tiny_model(tmp_path / "counter", counter=True)
    summary = bench.main(["--engine", "hf", "--model", str(model), "--dtype", "float32", "--pairs", "4",
                          "--sigma", "0.05", "--max-new-tokens", "24", "--out-dir", str(tmp_path)])
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("bench_heldout_transfer"))
    saved = json.loads((run_dir / "results.json").read_text())
    rows = saved["pairs"]
    assert len(rows) == 4 and saved["summary"] == summary
    for r in rows:
        assert r["d_train"] == pytest.approx(r["train_plus"] - r["train_minus"])
        assert r["d_test"] == pytest.approx(r["test_plus"] - r["test_minus"])
    d_train, d_test = np.array([r["d_train"] for r in rows]), np.array([r["d_test"] for r in rows])
    assert np.any(d_train != 0)  # sigma 0.05 changes the tiny model's answer lengths
    assert summary["pearson_d_train_d_test"] == pytest.approx(np.corrcoef(d_train, d_test)[0, 1])
    tests = np.array([[r["test_plus"], r["test_minus"]] for r in rows]).ravel()
    assert summary["member_test_std"] == pytest.approx(tests.std())
    assert summary["base_test"] < 0 and 0 <= summary["base_train_truncated"] <= 1


def test_spearman_is_the_pearson_of_ranks():
    a, b = [3.0, 1.0, 2.0, 10.0], [30.0, 5.0, 6.0, 7.0]
    assert bench.spearman(a, b) == pytest.approx(np.corrcoef([2, 0, 1, 3], [3, 0, 1, 2])[0, 1])


@pytest.mark.parametrize("bad", [["--pairs", "2"], ["--sigma", "0"], ["--max-new-tokens", "0"], ["--dtype", "int8"]])
def test_bad_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        bench.parse_args(bad)
