"""How good is one ES gradient estimate? Vanilla against mirrored at equal cost, and the price of dimension.

We maximise fitness. Every comparison holds the number of fitness evaluations N fixed, and uses the
estimators the rungs really use (quadratic_estimates / toy_estimates below, built from
es_mirrored.py's noise, perturb/restore, shaping and gradient functions):

    vanilla:   g = 1/(N sigma) sum_i shaped_i eps_i           shaped = f - mean(f) (quadratic: keeps the
               scale, so the squared error means something) or z-score (toy: es_basic.py's estimate)
    mirrored:  g = 1/(P sigma) sum_j (shaped_j+ - shaped_j-)/2 eps_j,   P = N/2 pairs (es_mirrored.py's)

1. Quadratic f(x) = -0.5 ||x - c||^2, 100 dimensions, N = 20, at x = 0 (true gradient c): squared
   error per coordinate and cosine to c, for several sigma and seeds (a seed draws c and the noise).
2. The toy task (es_basic.py's rings and 2-32-32-3 MLP, 1,251 weights, N = 50): cosine of each
   estimate to the gradient of the fitness from autograd, at three points of an es_basic.py run
   (the initial weights, after 100 and after 500 generations), for several sigma and seeds.
3. Dimension: the quadratic at sigma 0.1 (where it is nearly linear at the scale of the noise).
   Cosine to the true gradient against the dimension d at N = 50, and against N at d = 1,000,
   next to the formula for P Gaussian directions on a linear function,
       E[cos]^2 ~ P / (P + d + 1),      so cosine c needs P ~ c^2 (d + 1) / (1 - c^2) directions
   (vanilla uses about P = N - 1 after its baseline, mirrored P = N/2).

Run:   python bench/estimator_quality.py
See:   three tables on the console and in bench/results/estimator_quality.md (6 minutes on a 2-core
       CPU shared with another job, most of it in the toy runs).
"""

import contextlib
import io
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flags import parser_for  # bench/flags.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root

import es_basic  # noqa: E402
import es_mirrored  # noqa: E402


def floats(text):
    return [float(v) for v in text.split(",") if v]


def ints(text):
    return [int(v) for v in text.split(",") if v]


@dataclass
class Args:
    seeds: int = field(default=3, metadata={"help": "seeds 0..seeds-1 for every table"})
    quad_sigmas: str = field(default="0.1,0.3,1,3,10", metadata={"help": "table 1: noise scales"})
    quad_trials: int = field(default=400, metadata={"help": "table 1: estimates per cell and seed"})
    toy_sigmas: str = field(default="0.03,0.1,0.3", metadata={"help": "table 2: noise scales"})
    toy_generations: str = field(default="0,100,500", metadata={"help": "table 2: es_basic.py generations before measuring"})
    toy_trials: int = field(default=10, metadata={"help": "table 2: estimates per cell and seed"})
    dims: str = field(default="10,100,1000,10000,100000", metadata={"help": "table 3: dimensions at N = 50"})
    populations: str = field(default="20,50,200,800,3200", metadata={"help": "table 3: N at d = 1,000"})
    dim_trials: int = field(default=20, metadata={"help": "table 3: estimates per cell and seed"})
    out: str = field(default=str(REPO / "bench" / "results" / "estimator_quality.md"), metadata={"help": "markdown report"})


def parse_args(argv=None) -> Args:
    parser = parser_for(Args, __doc__.split("\n")[0])
    args = Args(**vars(parser.parse_args(argv)))
    try:
        values = [floats(args.quad_sigmas), floats(args.toy_sigmas), ints(args.toy_generations), ints(args.dims),
                  ints(args.populations)]
    except ValueError as err:
        parser.error(f"lists must be comma-separated numbers: {err}")
    if not all(values) or min(min(v) for v in values[:2]) <= 0 or min(values[2]) < 0:
        parser.error("every list needs values; sigmas must be > 0, generations >= 0")
    if min(values[3]) < 1 or min(values[4]) < 4 or any(n % 2 for n in values[4]):
        parser.error("dimensions must be >= 1 and populations even and >= 4")
    if min(args.seeds, args.quad_trials, args.toy_trials, args.dim_trials) < 1:
        parser.error("--seeds and every --*-trials must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# The two estimators at equal evaluations, built from es_mirrored.py's pieces (noise from seeds,
# perturb/restore, z-score, the gradient sum), so the bench measures what the rungs do.
# ---------------------------------------------------------------------------------------------
def quadratic_estimates(mirrored: bool, dim: int = 100, evaluations: int = 20, sigma: float = 0.1,
                        trials: int = 400, seed: int = 0):
    """`trials` ES estimates of the gradient of f(x) = -0.5 ||x - c||^2 at x = 0 (true gradient: c),
    each from the same number of evaluations N. Like for like with what the rungs really do:

        vanilla:   g = 1/(N sigma) sum_i (f_i - mean f) eps_i        rung 1's z-score without the
                   division by std (which only rescales g; the mean is the baseline that removes f(0))
        mirrored:  g = 1/(P sigma) sum_j (f_j+ - f_j-)/2 eps_j,  P = N/2 pairs (a baseline cancels here)

    Returns (estimates (trials, dim), c). Without the mean, vanilla's f(0) eps_i terms dominate: that
    comparison says nothing about mirroring, since every rung shapes fitness."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    f = lambda x: -0.5 * ((x - c) ** 2).sum(-1)  # noqa: E731  (x: (trials, k, dim))
    if mirrored:
        eps = torch.randn(trials, evaluations // 2, dim, generator=g, dtype=torch.float64)
        diff = (f(sigma * eps) - f(-sigma * eps)) / 2  # (trials, pairs)
        est = (diff[..., None] * eps).sum(1) / ((evaluations // 2) * sigma)
    else:
        eps = torch.randn(trials, evaluations, dim, generator=g, dtype=torch.float64)
        fit = f(sigma * eps)  # (trials, N)
        est = ((fit - fit.mean(1, keepdim=True))[..., None] * eps).sum(1) / (evaluations * sigma)
    return est, c


def toy_estimates(model: torch.nn.Module, x, y, mirrored: bool, sigma: float, evaluations: int, trials: int, seed: int = 0):
    """`trials` ES estimates of the gradient of this script's fitness at the model's weights, each
    from N = `evaluations` forward passes with z-score shaping: vanilla is es_basic.py's estimate
    (N seeds), mirrored es_mirrored.py's (N/2 pairs). Returns (estimates (trials, n_params), the true
    gradient of the fitness from autograd). Trial t draws its seeds with es_mirrored.member_seeds(seed + 7919, t, .),
    apart from the training seeds. The model's weights are left as they were."""
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    true = -torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])  # d fitness / d theta
    saved = [p.detach().clone() for p in params]
    ests = []
    for t in range(trials):
        seeds = es_mirrored.member_seeds(seed + 7919, t, evaluations // 2 if mirrored else evaluations)
        signs = (1.0, -1.0) if mirrored else (1.0,)
        fitness = []
        for s in seeds:
            for sign in signs:
                es_mirrored.perturb(params, s, sign * sigma)
                fitness.append(es_mirrored.fitness_of(model, x, y))
                es_mirrored.restore(params, saved)
        shaped = es_mirrored.zscore(np.array(fitness))
        weights = (shaped[0::2] - shaped[1::2]) / 2 if mirrored else shaped
        ests.append(torch.cat([g.flatten() for g in es_mirrored.es_gradient(params, seeds, weights, sigma)]))
    return torch.stack(ests), true


def cosines(estimates, true):
    """Cosine of each estimate (rows) to the true gradient: 1 = the right direction, ~0 = noise."""
    return torch.nn.functional.cosine_similarity(estimates, true[None].expand_as(estimates), dim=1)



def quadratic_cell(mirrored, dim, evaluations, sigma, trials, seed):
    """(mean squared error per coordinate, mean cosine), in chunks so d x N x trials stays small."""
    chunk = max(1, min(trials, 20_000_000 // (dim * evaluations)))
    sq, cos, done = 0.0, [], 0
    while done < trials:
        k = min(chunk, trials - done)
        est, c = quadratic_estimates(mirrored, dim, evaluations, sigma, k, seed=1000 * seed + done)
        sq += ((est - c) ** 2).mean().item() * k
        cos += cosines(est, c).tolist()
        done += k
    return sq / trials, float(np.mean(cos))


def formula_cosine(directions, dim):
    return math.sqrt(directions / (directions + dim + 1))


def mean_spread(values):
    return f"{np.mean(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows])


def trained_model(seed, generations, tmp):
    """es_basic.py's model after `generations` generations of its default run (0: the initial weights)."""
    model = es_basic.make_model(32, seed, n_classes=3)
    if generations:
        with contextlib.redirect_stdout(io.StringIO()):
            r = es_basic.main(["--seed", str(seed), "--generations", str(generations), "--adam-steps", "0",
                               "--eval-every", str(generations), "--out-dir", tmp])
        model.load_state_dict(torch.load(os.path.join(r["run_dir"], "model.pt")))
    return model


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0, seeds, sections = time.perf_counter(), range(args.seeds), []

    rows = []
    for sigma in floats(args.quad_sigmas):
        cells = {m: [quadratic_cell(m, 100, 20, sigma, args.quad_trials, s) for s in seeds] for m in (False, True)}
        mse_v, mse_m = ([c[0] for c in cells[m]] for m in (False, True))
        cos_v, cos_m = ([c[1] for c in cells[m]] for m in (False, True))
        rows.append([f"{sigma:g}", mean_spread(mse_v), mean_spread(mse_m), f"{np.mean(mse_v) / np.mean(mse_m):.2f}",
                     f"{np.mean(cos_v):.3f}", f"{np.mean(cos_m):.3f}"])
    sections.append(f"### 1. Quadratic, 100-d, N = 20 evaluations, {args.quad_trials} estimates x {args.seeds} seeds\n\n"
                    + table(["sigma", "vanilla (mean baseline) MSE", "mirrored MSE", "vanilla / mirrored",
                             "vanilla cosine", "mirrored cosine"], rows))
    print(sections[-1] + "\n", flush=True)

    toy = []
    with tempfile.TemporaryDirectory() as tmp:
        for gens in ints(args.toy_generations):
            for seed in seeds:
                x, y = es_basic.make_rings(1024, seed=seed)
                model = trained_model(seed, gens, tmp)
                loss = -es_basic.fitness_of(model, x, y)
                for sigma in floats(args.toy_sigmas):
                    cos = [cosines(*toy_estimates(model, x, y, m, sigma, 50, args.toy_trials, seed))
                           .mean().item() for m in (False, True)]
                    toy.append(dict(gens=gens, seed=seed, loss=loss, sigma=sigma, vanilla=cos[0], mirrored=cos[1]))
            print(f"  toy: {gens} generations measured ({time.perf_counter() - t0:.0f} s)", flush=True)
    out_rows = []
    for gens in ints(args.toy_generations):
        for sigma in floats(args.toy_sigmas):
            cell = [r for r in toy if r["gens"] == gens and r["sigma"] == sigma]
            v, m = [r["vanilla"] for r in cell], [r["mirrored"] for r in cell]
            out_rows.append([gens, mean_spread([r["loss"] for r in cell]), f"{sigma:g}", mean_spread(v), mean_spread(m),
                             sum(a > b for a, b in zip(m, v))])
    sections.append(f"### 2. Toy task (1,251 weights), N = 50 evaluations, cosine to the autograd gradient, "
                    f"mean of {args.toy_trials} estimates per seed, {args.seeds} seeds (mean, min-max over seeds)\n\n"
                    + table(["es_basic generations", "training loss there", "sigma", "vanilla (z-score) cosine",
                             "mirrored cosine", "seeds where mirrored is better"], out_rows))
    print(sections[-1] + "\n", flush=True)

    rows = []
    for d in ints(args.dims):
        cos = [np.mean([quadratic_cell(m, d, 50, 0.1, args.dim_trials, s)[1] for s in seeds]) for m in (False, True)]
        rows.append([f"{d:,}", "50", f"{cos[0]:.3f}", f"{formula_cosine(49, d):.3f}", f"{cos[1]:.3f}",
                     f"{formula_cosine(25, d):.3f}"])
    for n in ints(args.populations):
        cos = [np.mean([quadratic_cell(m, 1000, n, 0.1, args.dim_trials, s)[1] for s in seeds]) for m in (False, True)]
        rows.append(["1,000", f"{n:,}", f"{cos[0]:.3f}", f"{formula_cosine(n - 1, 1000):.3f}", f"{cos[1]:.3f}",
                     f"{formula_cosine(n // 2, 1000):.3f}"])
    need = [[f"{c:g}"] + [f"{math.ceil(c * c * (d + 1) / (1 - c * c)):,}" for d in (1_251, 17_283, 134_500_000)]
            for c in (0.1, 0.5, 0.9)]
    sections.append(f"### 3. Dimension, quadratic, sigma 0.1, {args.dim_trials} estimates x {args.seeds} seeds: "
                    f"mean cosine to the true gradient, measured and from sqrt(P / (P + d + 1))\n\n"
                    + table(["d", "N", "vanilla measured", "formula (P = N - 1)", "mirrored measured",
                             "formula (P = N / 2)"], rows)
                    + "\n\nDirections P needed for a given cosine, from the formula (a linear fitness; mirrored "
                      "needs 2P evaluations, vanilla about P + 1):\n\n"
                    + table(["cosine", "d = 1,251 (rungs 1-2)", "d = 17,283 (rung 4)", "d = 134.5M (SmolLM2-135M, rung 5)"],
                            need))
    print(sections[-1] + "\n", flush=True)

    seconds = time.perf_counter() - t0
    header = (f"# ES estimator quality\n\nCommand: `python bench/estimator_quality.py` ({seconds:.0f} s, "
              f"torch {torch.__version__}, 1 thread). Written by bench/estimator_quality.py.\n\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(header + "\n\n".join(sections) + "\n")
    print(f"{seconds:.0f} s; report: {args.out}")
    return {"seconds": seconds, "out": args.out, "toy": toy}


if __name__ == "__main__":
    main()
