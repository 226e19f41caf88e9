"""studies/ray_engines.py end to end on a tiny model: es_llm_ray.py with 1 engine and with 2 Ray
actors; both reach the same weights and only a few kilobytes cross per generation.
Skipped without Ray (CI installs it)."""

import json
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install ray==2.60.0); CI installs it")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies"))

import ray_engines  # noqa: E402


def test_ray_engines_bench_rung5_same_weights_and_kilobytes_per_generation(tmp_path, capsys):
    out = tmp_path / "ray.json"
    result = ray_engines.main(["--generations", "2", "--population-size", "4", "--max-new-tokens", "8",
                               "--out", str(out)])
    r = result["rung5"]
    assert r["same_final_weights"] is True
    assert len(r["seconds_per_generation_1"]) == len(r["seconds_per_generation_2"]) == 2
    # seeds, problems, fitness, coefficients and checksums: under 3 kB
    assert len(r["bytes_per_generation"]) == 2 and all(0 < b < 3_000 for b in r["bytes_per_generation"])
    one, two = r["seconds_per_generation_1"][1:], r["seconds_per_generation_2"][1:]  # after the warm-up
    assert r["speedup_1_over_N"] == pytest.approx(statistics.median(one) / statistics.median(two), abs=1e-3)
    assert json.loads(out.read_text())["rung5"]["bytes_per_generation"] == r["bytes_per_generation"]
    assert "es_llm_ray: " in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--engines", "1"], ["--engines", "3"], ["--generations", "0"]])
def test_ray_engines_bench_rejects_bad_flags(bad, capsys):
    with pytest.raises(SystemExit):
        ray_engines.main(bad)
    assert "--engines must be >= 2 and <= --cpus" in capsys.readouterr().err
