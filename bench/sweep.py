"""Sensitivity of vanilla ES on the toy task: sigma x learning rate, and population x batch.

Two grids, several seeds per cell, on es_basic.py's rings task and 2-32-32-3 MLP (same data,
same initial weights, same update rule; we maximise fitness = minus the cross-entropy):

1. sigma x lr: population 50 (es_basic.py's), 400 generations, each fitness evaluation on a batch
   of 256 of the 1,024 training points (the same points for every member of a generation, a fresh
   random subset each generation; es_basic.py uses all 1,024, which costs 4x more per run).
2. population size N x batch B at a fixed evaluation budget of `--budget` point-evaluations
   (generations = budget / (N * B)), sigma 0.1 and lr 0.03 (es_basic.py's): small N and B give many
   cheap, noisy steps, large N and B few accurate ones (the "samples per step" question). The
   default budget is grid 1's run, so the cell N=50, B=256 is grid 1's cell sigma 0.1, lr 0.03
   (same seeds: identical runs).

Each cell reports the held-out accuracy (2,048 unseen points) at the end, mean and standard
deviation over `--seeds` seeds, in two heatmaps per grid (sweep_sigma_lr.png,
sweep_pop_batch.png). A cell is marked "loss up" when a seed ends with a higher training loss than
it started with (ES diverged: steps too large for the noise they are estimated from), and the
console names the cells where ES stalls (held-out accuracy below 50%: it never left the start).

The update is es_basic.py's: g = 1/(N sigma) * sum_i zscore(f)_i * eps_i, theta <- theta + lr * g.
For speed the population is evaluated in one batched forward pass (torch.baddbmm over the N
perturbed copies of each layer) and each generation draws its noise as one (N, parameters)
tensor from a generator seeded by (seed, generation), instead of es_basic.py's per-(member,
tensor) streams. Given the same noise, one generation here equals one generation of es_basic.py
up to float rounding (tests/test_bench_sweep.py checks it).

Run:   python bench/sweep.py
See:   two PNGs, runs.csv and summary.json in runs/bench_sweep__<seed>__<time>/ and a summary per
       grid: 135 runs of 5.12M point-evaluations each on 2 worker processes, 16 minutes on a 2-core
       CPU shared with other jobs (load average 6-10). The best cells reach 91-95% held-out
       accuracy; `--replot <folder>` redraws the PNGs from runs.csv.
"""

import csv
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flags import parser_for  # bench/flags.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root

import es_basic  # noqa: E402

STALL_ACC = 0.5  # held-out accuracy below this at the end: ES never left the start (chance is 1/3)


def floats(text):
    return [float(v) for v in text.split(",") if v]


def ints(text):
    return [int(v) for v in text.split(",") if v]


@dataclass
class Args:
    sigmas: str = field(default="0.01,0.03,0.1,0.3,1", metadata={"help": "grid 1: noise scales, comma separated"})
    lrs: str = field(default="0.003,0.01,0.03,0.1,0.3", metadata={"help": "grid 1: learning rates, comma separated"})
    population_size: int = field(default=50, metadata={"help": "grid 1: population N"})
    batch: int = field(default=256, metadata={"help": "grid 1: training points per fitness evaluation"})
    generations: int = field(default=400, metadata={"help": "grid 1: generations"})
    populations: str = field(default="10,20,50,100,200", metadata={"help": "grid 2: population sizes"})
    batches: str = field(default="16,64,256,1024", metadata={"help": "grid 2: training points per fitness evaluation"})
    budget: int = field(default=5_120_000, metadata={"help": "grid 2: point-evaluations per run "
                                                             "(generations x N x batch); 5.12M = grid 1's runs "
                                                             "(400 generations of N=50 on 256 points)"})
    sigma: float = field(default=0.1, metadata={"help": "grid 2: noise scale (es_basic default)"})
    lr: float = field(default=0.03, metadata={"help": "grid 2: learning rate (es_basic default)"})
    seeds: int = field(default=3, metadata={"help": "seeds per cell (data, initial weights and noise): 0..seeds-1"})
    seed: int = field(default=0, metadata={"help": "added to every run's seed (a different set of seeds)"})
    grids: str = field(default="sigma_lr,pop_batch", metadata={"help": "which grids to run"})
    workers: int = field(default=2, metadata={"help": "worker processes (1 torch thread each)"})
    replot: str = field(default="", metadata={"help": "only redraw the PNGs and summary of this finished (or "
                                                     "interrupted) sweep folder from its runs.csv"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run folder"})


def parse_args(argv=None) -> Args:
    parser = parser_for(Args, __doc__.split("\n")[0])
    args = Args(**vars(parser.parse_args(argv)))
    try:
        sigmas, lrs, pops, batches = floats(args.sigmas), floats(args.lrs), ints(args.populations), ints(args.batches)
    except ValueError as err:
        parser.error(f"grid values must be comma-separated numbers: {err}")
    if not sigmas or not lrs or not pops or not batches:
        parser.error("every grid needs at least one value")
    if not all(v > 0 and np.isfinite(v) for v in sigmas + lrs + [args.sigma, args.lr]):
        parser.error("sigmas and learning rates must be positive numbers")
    if min(pops) < 2:
        parser.error("--populations must be >= 2 (z-scores compare members)")
    if min(batches) < 1 or max(batches) > 1024:
        parser.error("--batches must be in 1..1024 (the training set has 1,024 points)")
    if args.population_size < 2 or args.generations < 1 or args.seeds < 1 or args.workers < 1:
        parser.error("--population-size >= 2, --generations, --seeds and --workers >= 1")
    if not 1 <= args.batch <= 1024:
        parser.error("--batch must be in 1..1024 (the training set has 1,024 points)")
    if args.budget < max(pops) * max(batches):
        parser.error("--budget must allow at least one generation of the largest population and batch")
    grids = [g for g in args.grids.split(",") if g]
    if not grids or any(g not in ("sigma_lr", "pop_batch") for g in grids):
        parser.error("--grids must be sigma_lr, pop_batch or both")
    return args


# ---------------------------------------------------------------------------------------------
# Batched ES on the MLP: the whole population in one forward pass
# ---------------------------------------------------------------------------------------------
def flat_params(model):
    """theta: one flat vector (P,) holding every parameter; the model's parameters become views
    into it, so the model always sees the current theta (for es_basic.accuracy/fitness_of)."""
    params = list(model.parameters())
    theta = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for p in params:
        p.data = theta[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return theta, [p.shape for p in params]


@torch.no_grad()
def population_fitness(theta, shapes, eps, sigma, x, y):
    """Fitness of theta + sigma * eps_i for every row i of eps (N, P), as es_basic.fitness_of.

    shapes: the MLP's [W1, b1, W2, b2, W3, b3] shapes (nn.Linear layout, W: (out, in))."""
    n = eps.shape[0]
    members = theta + sigma * eps  # (N, P): the same arithmetic as es_basic.perturb
    pieces = [m.view(n, *shape) for m, shape in zip(members.split([s.numel() for s in shapes], dim=1), shapes)]
    h = x.unsqueeze(0).expand(n, *x.shape)  # (N, B, 2)
    for layer in range(0, len(pieces), 2):
        w, b = pieces[layer], pieces[layer + 1]  # (N, out, in), (N, out)
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))  # (N, B, out)
        if layer + 2 < len(pieces):
            h = torch.tanh(h)
    loss = F.cross_entropy(h.reshape(-1, h.shape[-1]), y.repeat(n), reduction="none").view(n, -1).mean(1)
    return -loss.numpy().astype(np.float64)  # we maximise fitness


@torch.no_grad()
def es_generation(theta, shapes, eps, sigma, lr, x, y):
    """One generation of es_basic.main given the noise: evaluate, shape, update theta in place."""
    fitness = population_fitness(theta, shapes, eps, sigma, x, y)
    shaped = torch.from_numpy(es_basic.zscore(fitness)).float()  # ES: shape fitness
    grad = (shaped @ eps) / (eps.shape[0] * sigma)  # g = 1/(N sigma) sum_i shaped_i eps_i
    theta.add_(lr * grad)  # ES: update  theta <- theta + lr * g
    return fitness


def generation_stream(seed, generation):
    """Every random draw of one generation (noise, batch) comes from this (seed, generation) stream."""
    state = np.random.SeedSequence([int(seed), int(generation), 0x5EE9]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def run_es(sigma, lr, population_size, batch, generations, seed, eval_every=10):
    """One ES run on es_basic's task; returns final/initial metrics and point-evaluations to 90%."""
    x, y = es_basic.make_rings(1024, seed=seed)
    x_test, y_test = es_basic.make_rings(2048, seed=seed + 10_000)
    model = es_basic.make_model(32, seed, n_classes=3)
    theta, shapes = flat_params(model)
    initial_loss = -es_basic.fitness_of(model, x, y)
    initial_acc = es_basic.accuracy(model, x_test, y_test)
    reached, evaluations, t0 = None, 0, time.perf_counter()
    for gen in range(1, generations + 1):
        stream = generation_stream(seed, gen)
        eps = torch.randn(population_size, theta.numel(), generator=stream)  # ES: sample
        if batch < len(x):  # the same random points for every member of this generation
            pick = torch.randperm(len(x), generator=stream)[:batch]
            xb, yb = x[pick], y[pick]
        else:
            xb, yb = x, y
        fitness = es_generation(theta, shapes, eps, sigma, lr, xb, yb)
        evaluations += population_size * batch
        if not np.all(np.isfinite(fitness)):
            break  # diverged to inf/NaN: stop, report as diverged
        if reached is None and (gen % eval_every == 0 or gen == generations):
            if es_basic.accuracy(model, x_test, y_test) >= es_basic.TARGET_ACC:
                reached = evaluations
    final_loss = -es_basic.fitness_of(model, x, y)
    final_acc = es_basic.accuracy(model, x_test, y_test)
    diverged = not np.isfinite(final_loss) or final_loss > initial_loss
    return {"initial_loss": initial_loss, "final_loss": final_loss, "initial_acc": initial_acc,
            "final_acc": final_acc, "diverged": bool(diverged), "point_evals_to_90": reached,
            "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------------------------------------
# Grids, workers, files
# ---------------------------------------------------------------------------------------------
def make_tasks(args):
    tasks = []
    seeds = [args.seed + k for k in range(args.seeds)]
    if "sigma_lr" in args.grids:
        for sigma in floats(args.sigmas):
            for lr in floats(args.lrs):
                for s in seeds:
                    tasks.append({"grid": "sigma_lr", "sigma": sigma, "lr": lr, "population_size": args.population_size,
                                  "batch": args.batch, "generations": args.generations, "seed": s})
    if "pop_batch" in args.grids:
        for n in ints(args.populations):
            for b in ints(args.batches):
                for s in seeds:
                    tasks.append({"grid": "pop_batch", "sigma": args.sigma, "lr": args.lr, "population_size": n,
                                  "batch": b, "generations": max(1, args.budget // (n * b)), "seed": s})
    return tasks


def init_worker():
    torch.set_num_threads(1)  # two workers on two cores; more threads only contend


def work(task):
    return {**task, **run_es(task["sigma"], task["lr"], task["population_size"], task["batch"],
                             task["generations"], task["seed"])}


COLUMNS = ["grid", "sigma", "lr", "population_size", "batch", "generations", "seed", "initial_loss", "final_loss",
           "initial_acc", "final_acc", "diverged", "point_evals_to_90", "seconds"]


def cell_table(rows, row_key, col_key):
    """{(row value, col value): [final accuracies]} and the set of cells with a diverged seed."""
    acc, div = {}, set()
    for r in rows:
        key = (r[row_key], r[col_key])
        acc.setdefault(key, []).append(r["final_acc"])
        if r["diverged"]:
            div.add(key)
    return acc, div


def heatmap(rows, row_key, col_key, row_label, col_label, title, path, extra=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    acc, div = cell_table(rows, row_key, col_key)
    rvals = sorted({k[0] for k in acc})
    cvals = sorted({k[1] for k in acc})
    mean = np.full((len(rvals), len(cvals)), np.nan)
    std = np.full_like(mean, np.nan)
    for (r, c), v in acc.items():
        mean[rvals.index(r), cvals.index(c)] = np.mean(v)
        std[rvals.index(r), cvals.index(c)] = np.std(v)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6))
    for ax, data, name, cmap, vmax in ((axes[0], mean, "mean held-out accuracy", "viridis", 1.0),
                                       (axes[1], std, "spread over seeds (std)", "magma_r", None)):
        im = ax.imshow(data, cmap=cmap, vmin=0.0 if name.startswith("spread") else 1 / 3, vmax=vmax,
                       origin="lower", aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.046)
        for i, r in enumerate(rvals):
            for j, c in enumerate(cvals):
                if np.isnan(data[i, j]):
                    continue
                text = f"{data[i, j]:.0%}" if name.startswith("mean") else f"{data[i, j] * 100:.1f}"
                if name.startswith("mean") and (r, c) in div:
                    text += "\nloss up"
                if name.startswith("mean") and extra:
                    text += "\n" + extra(r, c)
                bright = (data[i, j] - (1 / 3 if name.startswith("mean") else 0)) / ((vmax or np.nanmax(std) or 1)
                                                                                     - (1 / 3 if name.startswith("mean") else 0))
                ax.text(j, i, text, ha="center", va="center", fontsize=7.5,
                        color="black" if (bright > 0.6) == name.startswith("mean") else "white")
        ax.set_xticks(range(len(cvals)), [f"{c:g}" for c in cvals])
        ax.set_yticks(range(len(rvals)), [f"{r:g}" for r in rvals])
        ax.set(xlabel=col_label, ylabel=row_label, title=name + (" (points)" if name.startswith("spread") else ""))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(rows, row_key, col_key, label):
    acc, div = cell_table(rows, row_key, col_key)
    means = {k: float(np.mean(v)) for k, v in acc.items()}
    best = max(means, key=means.get)
    near = [k for k, m in means.items() if m >= means[best] - 0.02]
    stalled = sorted(k for k, m in means.items() if m < STALL_ACC and k not in div)
    lines = [f"{label}: best {row_key}={best[0]:g}, {col_key}={best[1]:g}: {means[best]:.1%} "
             f"(std {np.std(acc[best]) * 100:.1f} points)",
             f"  within 2 points of the best: {len(near)} of {len(means)} cells: "
             + ", ".join(f"({a:g}, {b:g})" for a, b in sorted(near)),
             f"  diverged (a seed ended with a higher training loss than it started): "
             + (", ".join(f"({a:g}, {b:g})" for a, b in sorted(div)) or "none"),
             f"  stalled (mean held-out accuracy < {STALL_ACC:.0%}, no divergence): "
             + (", ".join(f"({a:g}, {b:g})" for a, b in stalled) or "none")]
    return lines, {"best": list(best), "best_mean": means[best], "near_best": [list(k) for k in near],
                   "diverged": [list(k) for k in sorted(div)], "stalled": [list(k) for k in stalled],
                   "means": {f"{a:g},{b:g}": m for (a, b), m in sorted(means.items())}}


def write_outputs(args, rows, run_dir):
    summary = {}
    if any(r["grid"] == "sigma_lr" for r in rows):
        part = [r for r in rows if r["grid"] == "sigma_lr"]
        heatmap(part, "sigma", "lr", "sigma (noise scale)", "learning rate",
                f"vanilla ES on the rings task: N={args.population_size}, {args.batch} points per evaluation, "
                f"{args.generations} generations, {args.seeds} seeds per cell\n"
                f"'loss up': a seed ended with a higher training loss than it started with",
                run_dir / "sweep_sigma_lr.png")
        lines, summary["sigma_lr"] = summarize(part, "sigma", "lr", "sigma x lr")
        print("\n".join(lines))
    if any(r["grid"] == "pop_batch" for r in rows):
        part = [r for r in rows if r["grid"] == "pop_batch"]
        gens = {(r["population_size"], r["batch"]): r["generations"] for r in part}
        heatmap(part, "population_size", "batch", "population size N", "training points per fitness evaluation",
                f"fixed budget of {args.budget / 1e6:g}M point-evaluations (g = generations), sigma {args.sigma:g}, "
                f"lr {args.lr:g}, {args.seeds} seeds per cell",
                run_dir / "sweep_pop_batch.png", extra=lambda r, c: f"g={gens[(r, c)]}")
        lines, summary["pop_batch"] = summarize(part, "population_size", "batch", "population x batch")
        print("\n".join(lines))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_runs(path):
    rows = []
    with open(path) as fh:
        for r in csv.DictReader(fh):
            row = {k: r[k] for k in COLUMNS}
            for k in ("sigma", "lr", "initial_loss", "final_loss", "initial_acc", "final_acc", "seconds"):
                row[k] = float(row[k])
            for k in ("population_size", "batch", "generations", "seed"):
                row[k] = int(row[k])
            row["diverged"] = row["diverged"] == "True"
            rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        run_dir = Path(args.replot)
        saved = json.loads((run_dir / "args.json").read_text())
        args = Args(**{**saved, "replot": args.replot})
        rows = read_runs(run_dir / "runs.csv")
        return {"rows": rows, "summary": write_outputs(args, rows, run_dir), "run_dir": str(run_dir)}
    tasks = make_tasks(args)
    # longest first, so that two workers finish together
    tasks.sort(key=lambda t: -(t["generations"] * (t["population_size"] * t["batch"] + 2000)))
    run_dir = Path(args.out_dir) / f"bench_sweep__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    print(f"{len(tasks)} ES runs ({args.seeds} seeds per cell) on {args.workers} worker process(es); "
          f"toy MLP with 1,251 parameters; run folder {run_dir}")
    rows, t0 = [], time.perf_counter()
    with open(run_dir / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        pool = None
        if args.workers > 1:
            ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread pool inherited through fork
            pool = ctx.Pool(args.workers, initializer=init_worker)
            results = pool.imap_unordered(work, tasks)
        else:
            init_worker()
            results = map(work, tasks)
        try:
            bar = tqdm(results, total=len(tasks), desc="sweep", unit="run")
            for row in bar:
                rows.append(row)
                writer.writerow({k: row[k] for k in COLUMNS})
                fh.flush()  # an interrupted sweep keeps every finished run
                bar.set_postfix(last=f"{row['grid']} acc {row['final_acc']:.0%}")
        except KeyboardInterrupt:
            print("\ninterrupted: plotting the finished runs")
            if pool is not None:
                pool.terminate()
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    wall = time.perf_counter() - t0
    summary = write_outputs(args, rows, run_dir) if rows else {}
    print(f"{len(rows)} runs in {wall:.0f} s wall; PNGs, runs.csv and summary.json in {run_dir}")
    return {"rows": rows, "summary": summary, "run_dir": str(run_dir), "wall_s": wall}


if __name__ == "__main__":
    main()
