"""The toy rungs against the library a learner would pick instead (EvoTorch), at equal forward passes.

We maximise fitness (minus the training cross-entropy). Every method starts from the same weights
(es_basic.make_model with the run's seed) on the same data (rung 1's rings task, 1,024 training and
2,048 held-out points), evaluates 50 perturbed models per generation and runs the same number of
generations, so every method spends the same number of forward passes on the training set
(500 generations = 25,000). The rungs run as their own main(); EvoTorch 0.6.1 runs as a library, at
its documented settings:

    es_basic          rung 1: vanilla ES, z-score, theta += lr * g (sigma 0.1, lr 0.03)
    es_mirrored       rung 2: 25 mirrored pairs, z-score, theta += lr * g (sigma 0.1, lr 0.03)
    es_mirrored_adam  rung 2 with --optimizer adam: Adam on -g (sigma 0.1, lr --adam-lr)
    snes              evotorch SNES, stdev_init 0.1, its default learning rates (center 1.0; stdev
                      0.2 (3 + log d) / sqrt(d)), NES utilities; per-weight sigma adapted
    pgpe              evotorch PGPE, symmetric pairs, centered ranks, ClipUp (center_learning_rate
                      0.15, max_speed 0.3, momentum 0.9), stdev_learning_rate 0.1, stdev_init 0.1,
                      stdev_max_change 0.2 (its default); per-weight sigma adapted
    pgpe_fixed_sigma  the same PGPE with stdev_learning_rate 0: what sigma adaptation buys

Reported per method over seeds: forward passes until the held-out accuracy first reaches 90%
(measured every --eval-every generations) and the final held-out accuracy, as mean +- std.

Run:   python bench/peers.py                       (pip install -r requirements-bench.txt for EvoTorch)
See:   a table on the console and in bench/results/peers.{json,md,png}; 6.4 minutes on a 2-core CPU
       (one thread). Seeds 0-4, forward passes to 90% and final held-out accuracy, mean +- std:
       es_basic 9,800 +- 2,110 and 92.3% +- 1.5; es_mirrored 9,500 +- 2,806 and 92.5% +- 2.4;
       es_mirrored_adam 4,400 +- 418 and 95.7% +- 0.7; snes 6,300 +- 2,225 and 94.6% +- 1.2;
       pgpe 5,200 +- 975 and 96.7% +- 0.4; pgpe_fixed_sigma 4,900 +- 1,245 and 95.6% +- 0.6.
       The optimizer closes the gap in speed (Adam 0.85x PGPE's forward passes to 90% on seeds 0-4,
       1.00x on seeds 3-7 with `--seeds 3,4,5,6,7 --methods es_mirrored_adam,pgpe`); sigma adaptation
       adds about one point of final accuracy (PGPE 96.7% against 95.6% with a fixed sigma).
"""

import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from flags import parser_for  # noqa: E402  (bench/flags.py: this script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root

import es_basic  # noqa: E402
import es_mirrored  # noqa: E402

RUNGS = ("es_basic", "es_mirrored", "es_mirrored_adam")
LIBRARY = ("snes", "pgpe", "pgpe_fixed_sigma")
METHODS = RUNGS + LIBRARY
TASK, SIGMA, LR = "rings", 0.1, 0.03  # the rungs' defaults; the library uses its own documented settings


@dataclass
class Args:
    seeds: str = field(default="0,1,2,3,4", metadata={"help": "comma-separated seeds (data, initial weights, noise)"})
    generations: int = field(default=500, metadata={"help": "generations per run; forward passes = generations x population"})
    population_size: int = field(default=50, metadata={"help": "forward passes per generation, for every method (even)"})
    methods: str = field(default=",".join(METHODS), metadata={"help": "comma-separated subset of: " + ", ".join(METHODS)})
    adam_lr: float = field(default=0.05, metadata={"help": "lr of es_mirrored.py --optimizer adam (about the step per weight; tuned on seeds 0-2 over 0.01, 0.02, 0.03, 0.05)"})
    eval_every: int = field(default=10, metadata={"help": "held-out accuracy every this many generations"})
    n_train: int = field(default=1024, metadata={"help": "training points (rung 1's default)"})
    n_test: int = field(default=2048, metadata={"help": "held-out points (rung 1's default)"})
    out: str = field(default=str(REPO / "bench" / "results" / "peers"),
                     metadata={"help": "output prefix: writes <out>.json, <out>.md and <out>.png"})


def parse_args(argv=None) -> Args:
    parser = parser_for(Args, __doc__.split("\n")[0])
    args = Args(**vars(parser.parse_args(argv)))
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if not seeds or unknown or not args.methods:
        parser.error(f"--seeds must name at least one seed; unknown --methods {unknown}: choose from {', '.join(METHODS)}")
    if args.population_size < 2 or args.population_size % 2:
        parser.error("--population-size must be even and >= 2 (mirrored methods use pairs)")
    if args.generations < 1 or args.eval_every < 1 or args.n_train < 1 or args.n_test < 1:
        parser.error("--generations, --eval-every, --n-train and --n-test must be >= 1")
    if not args.adam_lr > 0:
        parser.error("--adam-lr must be > 0")
    return args


def data(args: Args, seed: int):
    x, y = es_basic.make_data(TASK, args.n_train, seed=seed)
    x_test, y_test = es_basic.make_data(TASK, args.n_test, seed=seed + 10_000)  # the rungs' held-out split
    return x, y, x_test, y_test


def run_rung(method: str, args: Args, seed: int):
    """The rung's own main(); returns [(forward passes, held-out accuracy)] at each evaluation."""
    module = es_basic if method == "es_basic" else es_mirrored
    flags = ["--task", TASK, "--seed", str(seed), "--generations", str(args.generations), "--population-size",
             str(args.population_size), "--sigma", str(SIGMA), "--lr", str(LR), "--eval-every", str(args.eval_every),
             "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--adam-steps", "0"]
    if method == "es_mirrored_adam":
        flags[flags.index("--lr") + 1] = str(args.adam_lr)
        flags += ["--optimizer", "adam"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        r = module.main(flags + ["--out-dir", tmp])
    return [(0, r["initial_acc"])] + [(row["evaluations"], row["test_acc"]) for row in r["rows"] if row["test_acc"] != ""]


def run_library(method: str, args: Args, seed: int):
    """EvoTorch's SNES or PGPE on the same model, weights and data; counts its fitness calls itself."""
    from evotorch import Problem
    from evotorch.algorithms import PGPE, SNES

    logging.getLogger("evotorch").setLevel(logging.WARNING)  # after its import, which sets INFO: one line per Problem

    x, y, x_test, y_test = data(args, seed)
    model = es_basic.make_model(32, seed, int(y.max()) + 1)
    center = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    calls = [0]

    def load(vector):
        torch.nn.utils.vector_to_parameters(vector.to(center.dtype), model.parameters())

    def fitness(vector):  # one forward pass on the training set, as in the rungs
        calls[0] += 1
        load(vector)
        return es_basic.fitness_of(model, x, y)

    torch.manual_seed(seed)
    problem = Problem("max", fitness, solution_length=center.numel(), dtype=torch.float32, seed=seed)
    if method == "snes":
        searcher = SNES(problem, popsize=args.population_size, stdev_init=0.1, center_init=center)
    else:
        searcher = PGPE(problem, popsize=args.population_size, center_learning_rate=0.15, optimizer="clipup",
                        optimizer_config={"max_speed": 0.3}, stdev_learning_rate=0.0 if method == "pgpe_fixed_sigma"
                        else 0.1, stdev_init=0.1, center_init=center)
    load(center)
    curve = [(0, es_basic.accuracy(model, x_test, y_test))]
    for gen in range(1, args.generations + 1):
        searcher.step()
        if gen % args.eval_every == 0 or gen == args.generations:
            load(searcher.status["center"])
            curve.append((calls[0], es_basic.accuracy(model, x_test, y_test)))
    return curve


def reached(curve, target=es_basic.TARGET_ACC):
    return next((n for n, acc in curve if acc >= target), None)


def summarise(results, methods):
    """Per method: forward passes to 90% (mean, std over the seeds that reached it, and how many did) and the
    final held-out accuracy (mean, std). std is the sample standard deviation over seeds (ddof 1)."""
    out = {}
    for m in methods:
        curves = results[m]
        hits = [reached(c) for c in curves.values()]
        ok = [h for h in hits if h is not None]
        finals = [c[-1][1] for c in curves.values()]
        out[m] = dict(reached_mean=float(np.mean(ok)) if ok else None, reached_std=float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0,
                      reached_count=len(ok), seeds=len(hits), reached=hits, final_mean=float(np.mean(finals)),
                      final_std=float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0, finals=finals, forward_passes=curves[next(iter(curves))][-1][0])
    return out


def table(summary):
    lines = ["| method | forward passes to 90% (mean ± std) | seeds reaching 90% | final held-out accuracy "
             "(mean ± std) | forward passes |", "|---|---|---|---|---|"]
    for m, s in summary.items():
        to90 = f"{s['reached_mean']:,.0f} ± {s['reached_std']:,.0f}" if s["reached_count"] else "not reached"
        lines.append(f"| {m} | {to90} | {s['reached_count']}/{s['seeds']} | {100 * s['final_mean']:.1f}% ± "
                     f"{100 * s['final_std']:.1f} | {s['forward_passes']:,} |")
    return "\n".join(lines)


def plot(results, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, curves in results.items():
        xs = np.array([n for n, _ in next(iter(curves.values()))])
        accs = np.array([[a for _, a in c] for c in curves.values()])  # (seeds, evaluations)
        line, = ax.plot(xs, accs.mean(0), label=m, lw=1.3)
        ax.fill_between(xs, accs.min(0), accs.max(0), color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(es_basic.TARGET_ACC, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="forward passes on the training set", ylabel="held-out accuracy (mean; band: min-max over seeds)",
           ylim=(0.2, 1.0), title="rings task, population 50, equal forward passes")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # a 1k-parameter MLP gains nothing from more threads
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m for m in METHODS if m in args.methods.split(",")]
    print(f"task {TASK} | population {args.population_size} | {args.generations} generations = "
          f"{args.generations * args.population_size:,} forward passes per run | seeds {seeds} | methods {methods}")
    results, t0, seconds = {}, time.perf_counter(), {}
    for m in methods:
        t1 = time.perf_counter()
        results[m] = {s: (run_rung if m in RUNGS else run_library)(m, args, s) for s in seeds}
        seconds[m] = time.perf_counter() - t1
        print(f"  {m}: final {[round(c[-1][1], 3) for c in results[m].values()]}, to 90% "
              f"{[reached(c) for c in results[m].values()]} ({seconds[m]:.0f} s)", flush=True)
    summary = summarise(results, methods)
    text = table(summary)
    ladder = {m: s for m, s in summary.items() if m in RUNGS and s["reached_count"] == s["seeds"]}
    ratio = None
    if ladder and "pgpe" in summary and summary["pgpe"]["reached_count"] == summary["pgpe"]["seeds"]:
        best = min(ladder, key=lambda m: ladder[m]["reached_mean"])
        ratio = dict(best=best, ratio=ladder[best]["reached_mean"] / summary["pgpe"]["reached_mean"])
        text += (f"\n\nBest ladder method: {best}, {ratio['ratio']:.2f}x PGPE's mean forward passes to 90% "
                 "(over the seeds above).")
    print(text)
    command = "python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.json", "w") as fh:
        json.dump(dict(args=asdict(args), command=command.strip(), torch=torch.__version__, seconds=seconds,
                       summary=summary, ratio_to_pgpe=ratio,
                       curves={m: {str(s): c for s, c in r.items()} for m, r in results.items()}), fh, indent=1)
    with open(f"{out}.md", "w") as fh:
        fh.write(f"# Peers on rung 1's rings task\n\nCommand: `{command.strip()}` (torch {torch.__version__}, one thread, "
                 f"seeds {args.seeds}, {time.perf_counter() - t0:.0f} s). Written by bench/peers.py; plot "
                 f"{out.name}.png.\n\n{text}\n")
    plot(results, f"{out}.png")
    return dict(summary=summary, results=results, ratio=ratio, table=text)


if __name__ == "__main__":
    main()
