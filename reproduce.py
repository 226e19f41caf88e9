"""Re-run the ladder's "what you should see" numbers and compare them with what the docs claim.

Every claimed number the README's ladder table shows is a row of CLAIMS below: the rung, the exact
command, the metric read from the run, the stated range (low, high) and where the range comes
from. This script runs each command once per seed (in this process for the toy rungs, as a
subprocess for the LLM rungs), prints claimed against measured, marks every number outside its
range with DRIFT, and exits 1 if any drifted (0 otherwise). A claim whose range is None is printed
as "not yet claimed" and never fails.

Run:   python reproduce.py --quick      the toy rungs 1-4, seed 0, each checked against the range
                                        stated over seeds (about 3 minutes on a 2-core CPU)
       python reproduce.py              also the LLM rungs 5-7 (their default commands, minutes each)
       python reproduce.py --seeds 0,1,2 --quick    more seeds (each one must land in the range)
       python reproduce.py --quick --dry-run        list the commands, run nothing
"""

import argparse
import contextlib
import csv
import io
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TBD = None  # a range not claimed yet: reported, never a failure

# (rung, command, metric, low, high, source). Ranges hold for every seed 0-4 unless the source says
# otherwise; accuracies in percent, as printed. A command is run once per seed with --seed appended.
CLAIMS = [
    (1, "python es_basic.py", "held-out accuracy %", 89.9, 93.9, "es_basic.py docstring, seeds 0-4"),
    (1, "python es_basic.py", "forward passes to 90%", 7500, 11500, "es_basic.py docstring, seeds 0-4"),
    (2, "python es_mirrored.py", "held-out accuracy %", 89.7, 96.2, "es_mirrored.py docstring, seeds 0-4"),
    (2, "python es_mirrored.py", "forward passes to 90%", 7000, 12500, "es_mirrored.py docstring, seeds 0-4"),
    (2, "python es_mirrored.py --optimizer adam --lr 0.05", "held-out accuracy %", 94.7, 96.4,
     "es_mirrored.py docstring, seeds 0-4"),
    (2, "python es_mirrored.py --optimizer adam --lr 0.05", "forward passes to 90%", 4000, 5000,
     "es_mirrored.py docstring, seeds 0-4"),
    (3, "python es_lora.py", "LoRA-ES held-out accuracy on the new task %", 92.2, 96.1,
     "measured, seeds 0-2: 96.1, 92.6, 92.2 (the es_lora.py docstring's 95.4 for seed 0 is stale)"),
    (4, "python es_eggroll.py", "held-out accuracy %", 92.0, 92.4, "es_eggroll.py docstring, seeds 0-2"),
    (5, "python es_llm_vllm.py", "final held-out reward", -99.4, -20.5,
     "RESULTS.md rung 5, float32 finals over seeds 0-9 (seed 0: -71.8)"),
    (6, "python es_llm_lora.py", "final held-out reward", -107.9, -48.1,
     "RESULTS.md rung 6, float32 finals over seeds 0-9 (seed 0: -81.1)"),
    (7, "python es_llm_eggroll.py", "final held-out reward", -101.4, -47.4,
     "RESULTS.md rung 7, float32 finals over seeds 0-9 (seed 0: -57.3)"),
]
TOY_RUNGS = (1, 2, 3, 4)


def check(value, low, high):
    """'ok', 'DRIFT' (outside [low, high] or no value) or 'not yet claimed' (no range)."""
    if low is None or high is None:
        return "not yet claimed"
    if value is None:
        return "DRIFT"
    return "ok" if low <= value <= high else "DRIFT"


def toy_metrics(script, result):
    """The claimed metrics of one toy run, from what its main() returns."""
    if script == "es_lora.py":
        lora = next(v for k, v in result.items() if isinstance(v, dict) and k.startswith("LoRA-ES (alternating"))
        return {"LoRA-ES held-out accuracy on the new task %": round(100 * lora["acc"], 1)}
    reached = result.get("reached")
    return {"held-out accuracy %": round(100 * result["final_acc"], 1), "forward passes to 90%": reached}


def run_toy(command, seed, out_dir):
    import importlib

    import torch
    argv = shlex.split(command)[1:]
    script, flags = argv[0], argv[1:]
    module = importlib.import_module(script[:-3])
    torch.set_num_threads(1)  # the threads the toy rungs' numbers were measured with
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = module.main(flags + ["--seed", str(seed), "--out-dir", out_dir])
    return toy_metrics(script, result)


def llm_argv(command):
    """The LLM command as run: es_llm_eggroll.py falls back to es_llm_lora.py --mode eggroll
    where the split rung is not there yet."""
    argv = shlex.split(command)
    if argv[1] == "es_llm_eggroll.py" and not (ROOT / argv[1]).exists():
        argv = [argv[0], "es_llm_lora.py", "--mode", "eggroll"] + argv[2:]
    return [sys.executable] + argv[1:]


def run_llm(command, seed, out_dir):
    argv = llm_argv(command) + ["--seed", str(seed), "--out-dir", out_dir]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
        return {"final held-out reward": None}
    metrics = sorted(Path(out_dir).glob("*/metrics.csv"))
    rows = [r for r in csv.DictReader(open(metrics[-1])) if r.get("eval_reward") not in (None, "")]
    return {"final held-out reward": round(float(rows[-1]["eval_reward"]), 1) if rows else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy rungs 1-4 only (about 3 minutes)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every one must land in each range")
    parser.add_argument("--dry-run", action="store_true", help="list the commands, run nothing")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rungs = TOY_RUNGS if args.quick else sorted({c[0] for c in CLAIMS})
    commands = list(dict.fromkeys(c[1] for c in CLAIMS if c[0] in rungs))  # each command runs once per seed
    if args.dry_run:
        for command in commands:
            print("python " + shlex.join(llm_argv(command)[1:]) if command.split()[1].startswith("es_llm")
                  else command, "--seed", ",".join(map(str, seeds)))
        return 0
    sys.path.insert(0, str(ROOT))
    measured, t0 = {}, time.perf_counter()
    for command in commands:
        rung = next(c[0] for c in CLAIMS if c[1] == command)
        for seed in seeds:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as out_dir:
                run = run_toy if rung in TOY_RUNGS else run_llm
                measured[command, seed] = run(command, seed, out_dir)
            print(f"ran  {command} --seed {seed}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n{'rung':<5}{'command':<52}{'metric':<46}{'seed':<6}{'claimed':<16}{'measured':<10}verdict")
    drift = 0
    for rung, command, metric, low, high, source in CLAIMS:
        if rung not in rungs:
            continue
        for seed in seeds:
            value = measured[command, seed].get(metric)
            verdict = check(value, low, high)
            drift += verdict == "DRIFT"
            claimed = "not claimed" if low is None else f"{low:g}-{high:g}"
            print(f"{rung:<5}{command:<52}{metric:<46}{seed:<6}{claimed:<16}{str(value):<10}{verdict}")
    print(f"\n{drift} number(s) outside their claimed range; {time.perf_counter() - t0:.0f} s in all")
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
