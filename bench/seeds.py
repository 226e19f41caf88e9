"""Does an LLM rung's default keep its promise on seeds it was never chosen on? Runs over seeds x dtypes.

A rung's command (its defaults, plus any flags after `--`) runs once per (seed, dtype), each run
alone on one core (taskset, one torch/OpenMP thread, vLLM bound to that core), one run per core of
`--cores` at a time, and the held-out reward at generation 0 and at the end is read from the run's metrics.csv.
Per dtype it prints the mean gain +- standard deviation, the worst seed, how many runs improved,
and the minutes a run took; "promise kept" (judged from 3 runs on) means every run improved and the mean gain is at least
twice the standard deviation of the gains. bfloat16 results depend on the thread count, so the
table says one thread; float32 results do not.

Run (rung 5's default on the confirmation seeds, both dtypes, one run per core):
    python bench/seeds.py --rung es_llm_vllm --seeds 3-9
    python bench/seeds.py --rung es_llm_lora --seeds 3-9
Results: runs.jsonl (one line per finished run; a second call with the same --out continues),
summary.md and gains.png in --out.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def parse_seeds(text):
    """'3-9' or '0,1,2' -> [3, ..., 9] / [0, 1, 2]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rung", required=True, choices=["es_llm_vllm", "es_llm_lora", "es_llm_eggroll"], help="The LLM rung to run.")
    p.add_argument("--seeds", default="3-9", help="Seeds: a range 3-9 or a list 0,1,2.")
    p.add_argument("--dtypes", default="float32,bfloat16", help="Comma-separated --dtype values.")
    p.add_argument("--cores", default="", help="Cores to run on, one run per core at a time (e.g. 0,1 or 1); "
                                             "default: every core.")
    p.add_argument("--out", default="", help="Folder for runs.jsonl, summary.md, gains.png and the run folders "
                                             "(default runs/seeds_<rung>).")
    p.add_argument("--label", default="default", help="Name of this configuration in the table.")
    p.add_argument("--dry-run", action="store_true", help="Print the commands, run nothing.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="After --: flags passed to the rung as they are.")
    args = p.parse_args(argv)
    args.rest = [a for a in args.rest if a != "--"]
    try:
        args.core_list = [int(c) for c in args.cores.split(",")] if args.cores else sorted(os.sched_getaffinity(0))
    except ValueError:
        p.error(f"--cores must be core numbers separated by commas, got {args.cores!r}")
    if not set(args.core_list) <= set(os.sched_getaffinity(0)):
        p.error(f"--cores {args.cores}: this machine's cores are {sorted(os.sched_getaffinity(0))}")
    try:
        args.seed_list = parse_seeds(args.seeds)
    except ValueError:
        p.error(f"--seeds must look like 3-9 or 0,1,2, got {args.seeds!r}")
    args.out = Path(args.out or REPO / "runs" / f"seeds_{args.rung}")
    return args


def command(args, seed, dtype, out_dir):
    return [sys.executable, str(REPO / f"{args.rung}.py"), "--seed", str(seed), "--dtype", dtype, "--checkpoint", "none",
            "--show", "0", "--out-dir", str(out_dir), *args.rest]


def run_one(args, seed, dtype, lane):
    out_dir = args.out / "runs" / f"{args.label}_{dtype}_{seed}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND=str(lane),
               PYTHONUNBUFFERED="1")
    cmd = ["taskset", "-c", str(lane)] + command(args, seed, dtype, out_dir)
    t0 = time.time()
    log = args.out / "logs" / f"{args.label}_{dtype}_{seed}.log"
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    minutes = (time.time() - t0) / 60
    if done.returncode != 0:
        return {"label": args.label, "seed": seed, "dtype": dtype, "error": f"exit {done.returncode}, see {log}"}
    run_dir = max(out_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["eval_reward"]]
    start, end = float(rows[0]["eval_reward"]), float(rows[-1]["eval_reward"])
    return {"label": args.label, "rung": args.rung, "seed": seed, "dtype": dtype, "threads": 1, "flags": args.rest,
            "start": start, "end": end, "gain": end - start, "minutes": round(minutes, 2), "run_dir": str(run_dir)}


def summarize(runs):
    """Per (label, dtype): n, mean gain, std, worst, improved, minutes, promise kept."""
    table = []
    for key in sorted({(r["label"], r["dtype"]) for r in runs}):
        rs = sorted((r for r in runs if (r["label"], r["dtype"]) == key and "gain" in r), key=lambda r: r["seed"])
        gains = np.array([r["gain"] for r in rs])
        table.append({"label": key[0], "dtype": key[1], "seeds": [r["seed"] for r in rs], "n": len(rs),
                      "mean": float(gains.mean()), "std": float(gains.std(ddof=1)) if len(rs) > 1 else 0.0,
                      "worst": float(gains.min()), "worst_seed": rs[int(gains.argmin())]["seed"],
                      "improved": int((gains > 0).sum()), "minutes": float(np.mean([r["minutes"] for r in rs])),
                      "gains": [round(float(g), 1) for g in gains]})
        t = table[-1]
        t["kept"] = (t["improved"] == t["n"] and t["mean"] >= 2 * t["std"]) if t["n"] >= 3 else None  # a spread needs runs
    return table


def report(table, out):
    lines = ["| configuration | dtype (1 thread) | seeds | held-out gain, mean +- std | worst (seed) | improved | "
             "promise kept | minutes a run | gains |", "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['label']} | {t['dtype']} | {t['seeds'][0]}-{t['seeds'][-1]} | {t['mean']:+.1f} +- "
                     f"{t['std']:.1f} | {t['worst']:+.1f} ({t['worst_seed']}) | {t['improved']}/{t['n']} | "
                     f"{ {True: 'yes', False: 'no', None: 'n/a (< 3 runs)'}[t['kept']]} | {t['minutes']:.1f} | {', '.join(f'{g:+.1f}' for g in t['gains'])} |")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    return text


def plot(runs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["label"], r["dtype"]) for r in runs if "gain" in r})
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(keys), 4))
    for k, key in enumerate(keys):
        gains = [r["gain"] for r in runs if (r["label"], r["dtype"]) == key and "gain" in r]
        ax.scatter([k] * len(gains), gains, alpha=0.7)
        ax.errorbar(k + 0.15, np.mean(gains), yerr=np.std(gains, ddof=1) if len(gains) > 1 else 0, fmt="s", capsize=4)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{a}\n{b}" for a, b in keys])
    ax.set(ylabel="held-out reward gain (end - start)", title="one point per seed; square: mean +- std")
    fig.tight_layout()
    fig.savefig(out / "gains.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    jobs = [(s, d) for d in args.dtypes.split(",") for s in args.seed_list]
    if args.dry_run:
        for s, d in jobs:
            print(" ".join(command(args, s, d, args.out / "runs")))
        return []
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(r["label"], r["seed"], r["dtype"]) for r in runs if "gain" in r}
    todo = [(s, d) for s, d in jobs if (args.label, s, d) not in done]
    print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} already in {path}), on cores {args.core_list}")
    free = list(args.core_list)

    def job(sd):
        lane = free.pop()
        try:
            return run_one(args, *sd, lane)
        finally:
            free.append(lane)

    with ThreadPoolExecutor(len(args.core_list)) as pool:
        for r in pool.map(job, todo):
            runs.append(r)
            with open(path, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: r.get(k) for k in ("label", "seed", "dtype", "start", "end", "gain", "minutes",
                                                     "error")}), flush=True)
    runs = [r for r in runs if "gain" in r]
    print(report(summarize(runs), args.out))
    plot(runs, args.out)
    return runs


if __name__ == "__main__":
    main()
