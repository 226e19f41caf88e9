"""reproduce.py: the claim table parses, the comparison flags drift, --dry-run lists the commands.
No long runs here: the real check is `python reproduce.py --quick` (about 3 minutes)."""
import os
import shlex
import subprocess
import sys

import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_claim_table_parses():
    assert {c[0] for c in reproduce.CLAIMS} == {1, 2, 3, 4, 5, 6, 7}
    for rung, command, metric, low, high, source in reproduce.CLAIMS:
        argv = shlex.split(command)
        assert argv[0] == "python" and argv[1].endswith(".py") and metric and source
        assert (low is None) == (high is None), (rung, metric)
        if low is None:
            assert rung not in reproduce.TOY_RUNGS  # only an LLM rung may be left open
        else:
            assert low <= high
            assert os.path.exists(os.path.join(ROOT, argv[1])), argv[1]  # a toy rung's script is there


def test_check_flags_a_value_outside_its_range_and_passes_one_inside():
    assert reproduce.check(92.0, 89.9, 93.9) == "ok"
    assert reproduce.check(89.9, 89.9, 93.9) == "ok" and reproduce.check(93.9, 89.9, 93.9) == "ok"
    assert reproduce.check(89.8, 89.9, 93.9) == "DRIFT"
    assert reproduce.check(95.0, 89.9, 93.9) == "DRIFT"
    assert reproduce.check(None, 7500, 11500) == "DRIFT"  # never reached 90%: drift, not a pass
    assert reproduce.check(-80.0, None, None) == "not yet claimed"


def test_toy_metrics_read_what_main_returns():
    assert reproduce.toy_metrics("es_basic.py", {"final_acc": 0.9312, "reached": 8000}) == {
        "held-out accuracy %": 93.1, "forward passes to 90%": 8000}
    summary = {"LoRA-ES (alternating)": {"acc": 0.954}, "full ES": {"acc": 0.958}}
    assert reproduce.toy_metrics("es_lora.py", summary) == {"LoRA-ES held-out accuracy on the new task %": 95.4}


def test_dry_run_lists_the_commands():
    out = subprocess.run([sys.executable, "reproduce.py", "--quick", "--dry-run", "--seeds", "0,1"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["python es_basic.py --seed 0,1", "python es_mirrored.py --seed 0,1",
                   "python es_mirrored.py --optimizer adam --lr 0.05 --seed 0,1", "python es_lora.py --seed 0,1",
                   "python es_eggroll.py --seed 0,1"]
    full = subprocess.run([sys.executable, "reproduce.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    assert "es_llm_vllm.py" in full and "es_llm_lora.py" in full


def test_main_exits_nonzero_on_drift(monkeypatch):
    monkeypatch.setattr(reproduce, "CLAIMS", [(1, "python es_basic.py", "held-out accuracy %", 89.9, 93.9, "x")])
    monkeypatch.setattr(reproduce, "run_toy", lambda command, seed, out_dir: {"held-out accuracy %": 80.0})
    assert reproduce.main(["--quick"]) == 1
    monkeypatch.setattr(reproduce, "run_toy", lambda command, seed, out_dir: {"held-out accuracy %": 92.0})
    assert reproduce.main(["--quick"]) == 0
