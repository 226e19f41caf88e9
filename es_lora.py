"""Rung 3: ES in LoRA space: evolve low-rank adapters of a frozen model, one factor at a time.

Idea
----
Rungs 1-2 evolved every weight of a network trained from scratch. Fine-tuning usually starts from
a pretrained model and changes it a little; LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv 2106.09685) freezes each chosen weight W (d_out x d_in) and learns
only a low-rank correction

    W_eff = W + (alpha / r) * B A,     B (d_out x r) starts at zero,  A (r x d_in) random,

so the adapted model starts as exactly the base model. Here ES evolves only A and B. We maximise
fitness (minus the cross-entropy on the new task); the loop is es_mirrored.py's (mirrored pairs,
z-score or centered-rank shaping). What is new is which tensors get noise, and how much.

Why not perturb A and B together (the --naive variant)? The weight the model sees is a product:

    (B + s eps_b)(A + s eps_a) = B A  +  s (eps_b A + B eps_a)  +  s^2 eps_b eps_a

The ES estimate models fitness as linear in the noise; the last term, the cross term, is
quadratic in it. So every member sits off the plane the estimate models (a mirrored pair shares
the same s^2 eps_b eps_a, so it measures the slope around a randomly shifted point), and the step
(A + dA, B + dB) moves the weight by B dA + dB A + dB dA, where dB dA is a direction that no
member tried and the estimate says nothing about. On top of that, the size of the eps_a part is
proportional to ||B|| and the eps_b part to ||A||: with B = 0 at the start, A's noise does
nothing at all, and later the effective step size drifts as the norms grow.

Alternating perturbation removes the cross term. Odd generations perturb only B, even
generations only A; with the other factor frozen, the weight is linear in the perturbed one:

    B-generation:  W + (alpha/r) (B + s_B eps) A = W_eff + (alpha/r) s_B eps A
    A-generation:  W + (alpha/r) B (A + s_A eps) = W_eff + (alpha/r) s_A B eps

so the members and the step lie in one linear subspace of weights, where ES is plain ES.
The start: generation 1 perturbs B (A is random, so B's noise moves the weight); from then on A
and B take turns. Any generation that finds some B still exactly zero perturbs B (perturbing A
there would change nothing: every fitness would be equal and the update zero).

Normalisation. In an A-generation the weight moves by (alpha/r) s_A B eps, a size proportional
to ||B||. So the noise of the active factor is divided by the norm of the frozen one, per adapted
layer, computed from the unperturbed adapters at the start of the generation:

    s_A = sigma / ((alpha/r) ||B||_F)        s_B = sigma / ((alpha/r) ||A||_F)

(||.||_F: the Frobenius norm; the denominator is floored at 1e-12). The weight then moves by
sigma eps (A / ||A||_F) or sigma (B / ||B||_F) eps: unit-norm factors, so sigma means the same at
every generation, whatever the norms of A and B, alpha, or the split of scale between them. The
estimate and the step use the same s_k (P pairs, w_j = (z_j+ - z_j-)/2 from the shaped fitness):

    g_k = 1/(P s_k) * sum_j w_j eps_jk            estimate of dF/dtheta_k
    theta_k <- theta_k + lr * (s_k / sigma)^2 * g_k

In the coordinate u = (alpha/r) ||B||_F A, which moves the weight with unit gain, this is
es_mirrored's rule exactly: members at u +/- sigma eps_j, u <- u + lr/(P sigma) sum_j w_j eps_j.
Hence the whole update is invariant to B -> c B, A -> A / c (tests/test_es_lora.py checks it; the
naive variant is not). The s_k are computed once per generation and kept: all members, the
estimate and the step use that one number. A restore by subtracting s_k eps would need exactly
this s_k (a norm recomputed from perturbed adapters is another number) and would still not be
bit-exact in floating point, so, as in rung 1, we restore by copying the saved adapters back.
The naive variant uses s_k = sigma for all A and B together and the plain update (s_k/sigma = 1);
--no-normalise keeps the alternation but uses s_k = sigma, to see which of the two fixes matters.

The task: the base is rung 1's 2-32-32-3 tanh MLP, fitted with Adam to the rings centred at the
origin, then frozen. The new task is the same rings with the centre moved to (0.4, 0), which the
base gets 61.9% right. For reference, full-parameter mirrored ES (es_mirrored.py's, started from
the base, all 1,251 weights and biases) runs with the same number of forward passes.

Run:   python es_lora.py                 (--naive adds the naive variant on the same seed)
See:   266 evolved parameters (21% of the base's 1,251); held-out accuracy on the new task goes
       from 61.9% (frozen base) to 95.4% with LoRA-ES, against 95.8% for full ES, after 8,000
       forward passes each (seed 0); about 70 s in all on a busy 2-core CPU (32 s of CPU time).
       --naive adds 89.3% for the naive variant (its training loss stalls near 0.25, LoRA-ES's
       reaches 0.09); --no-normalise gives 91.4%. On this toy LoRA-ES is not faster than full ES
       (two extra thin matmuls per adapted layer, while noise for 1,251 weights is cheap): what it
       buys is a 5x smaller search space here, and at LLM scale far less noise to draw and store.
       Output in runs/es_lora__<seed>__<time>/ (metrics.csv, curve.png with the methods run).
"""

import argparse
import copy
import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

NORM_FLOOR = 1e-12  # keeps s_k finite if a factor is exactly zero (its generation then gives a zero update)


@dataclass
class Args:
    population_size: int = field(default=40, metadata={"help": "N, evaluations per generation: N/2 mirrored pairs (must be even)"})
    sigma: float = field(default=0.2, metadata={"help": "noise scale of the weight change, after normalisation by the frozen factor's norm (see docstring)"})
    lr: float = field(default=0.1, metadata={"help": "step size: theta_k <- theta_k + lr * (s_k/sigma)^2 * g_k"})
    generations: int = field(default=200, metadata={"help": "number of ES updates (they alternate between B and A)"})
    seed: int = field(default=0, metadata={"help": "seeds data, base model, adapters and every noise draw"})
    eval_every: int = field(default=5, metadata={"help": "held-out evaluation every this many generations"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run folder"})
    shaping: str = field(default="zscore", metadata={"help": "fitness shaping: zscore or centered_rank (in [-0.5, 0.5])"})
    rank: int = field(default=2, metadata={"help": "r, the rank of each adapter B A"})
    alpha: float = field(default=2.0, metadata={"help": "LoRA scale: W_eff = W + (alpha/r) B A (the normalised variant is invariant to it)"})
    layers: str = field(default="0,1,2", metadata={"help": "comma-separated indices of the Linear layers that get adapters (0 = input, 2 = output)"})
    normalise: bool = field(default=True, metadata={"help": "divide the noise of the active factor by the frozen factor's norm (--no-normalise: the ablation, s_k = sigma)"})
    naive: bool = field(default=False, metadata={"help": "also run the naive variant (A and B perturbed together, no normalisation) on the same seed"})
    full_es: bool = field(default=True, metadata={"help": "also run full-parameter mirrored ES on all base weights with the same number of forward passes"})
    full_sigma: float = field(default=0.1, metadata={"help": "sigma of the full-parameter ES reference"})
    full_lr: float = field(default=0.02, metadata={"help": "lr of the full-parameter ES reference"})
    target_center: str = field(default="0.4,0", metadata={"help": "x,y centre of the rings of the new task (the base learned 0,0)"})
    hidden: int = field(default=32, metadata={"help": "width of the two hidden layers of the MLP"})
    n_train: int = field(default=1024, metadata={"help": "training points per task (fitness is computed on all of them)"})
    n_test: int = field(default=2048, metadata={"help": "held-out points per task for the reported accuracy"})
    pretrain_steps: int = field(default=300, metadata={"help": "full-batch Adam steps that fit the base model to the original task"})


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(
        description="ES fine-tuning through LoRA adapters with alternating A/B perturbation, on a toy 3-class problem.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(Args):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:  # --naive / --no-naive
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        choices = list(SHAPINGS) if f.name == "shaping" else None
        parser.add_argument(name, type=f.type, default=f.default, help=f.metadata["help"], choices=choices)
    args = Args(**vars(parser.parse_args(argv)))
    if args.population_size < 2 or args.population_size % 2:
        parser.error(f"--population-size must be even and >= 2 (it counts evaluations: N/2 pairs of +eps and -eps), "
                     f"got {args.population_size}")
    if not (args.sigma > 0 and args.full_sigma > 0):
        parser.error("--sigma and --full-sigma must be > 0")
    if not (args.lr > 0 and args.full_lr > 0):
        parser.error("--lr and --full-lr must be > 0")
    if args.generations < 1 or args.eval_every < 1:
        parser.error("--generations and --eval-every must be >= 1")
    if args.hidden < 1 or args.n_train < 1 or args.n_test < 1 or args.pretrain_steps < 0:
        parser.error("--hidden, --n-train and --n-test must be >= 1, --pretrain-steps >= 0")
    if args.rank < 1 or not args.alpha > 0:
        parser.error(f"--rank must be >= 1 and --alpha > 0, got {args.rank} and {args.alpha}")
    try:
        layers = parse_layers(args.layers)
    except ValueError:
        layers = []
    if not layers or any(i not in (0, 1, 2) for i in layers):
        parser.error(f"--layers must be distinct indices from 0,1,2 separated by commas, got {args.layers!r}")
    try:
        center = [float(v) for v in args.target_center.split(",")]
    except ValueError:
        center = []
    if len(center) != 2 or not all(np.isfinite(center)):
        parser.error(f"--target-center must be two finite numbers x,y, got {args.target_center!r}")
    return args


def parse_layers(text: str):
    layers = [int(v) for v in text.split(",")]
    return layers if len(set(layers)) == len(layers) else []


# ---------------------------------------------------------------------------------------------
# The toy tasks and the model
# ---------------------------------------------------------------------------------------------
def make_rings(n: int, seed: int, center=(0.0, 0.0)):
    """n points uniform in [-1.5, 1.5]^2; class 0/1/2 = inner disk / ring / outside (equal areas)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 3.0 - 1.5
    r = (x - torch.tensor(center)).norm(dim=1)
    r1, r2 = (3.0 / np.pi) ** 0.5, (6.0 / np.pi) ** 0.5  # each region has area 3 of the square's 9
    y = (r > r1).long() + (r > r2).long()
    return x, y


def make_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3))


@torch.no_grad()
def fitness_of(model: nn.Module, x, y) -> float:
    """We maximise fitness = minus the mean cross-entropy."""
    return -F.cross_entropy(model(x), y).item()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def pretrain(model: nn.Module, x, y, steps: int) -> nn.Module:
    """The 'pretrained base': fitted with full-batch Adam (any method would do), then frozen."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.requires_grad_(False)


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha/r) (x A^T) B^T with W, b frozen (Hu et al. 2021). Never builds B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        # A random, B zero (as in the paper): the adapted model starts as exactly the base model.
        dtype = base.weight.dtype
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator, dtype=dtype) / base.in_features**0.5)  # (r, d_in)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))  # (d_out, r)

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T  # (n, d_in) -> (n, r) -> (n, d_out)


def add_lora(base: nn.Module, layers, rank: int, alpha: float, seed: int):
    """A copy of the base with adapters on its Linear layers number `layers`; returns (model, adapters)."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    linear_positions = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    adapters = []
    for k in layers:
        model[linear_positions[k]] = LoRALinear(model[linear_positions[k]], rank, alpha, generator)
        adapters.append(model[linear_positions[k]])
    return model, adapters


# ---------------------------------------------------------------------------------------------
# ES building blocks: noise from seeds, perturb/restore, shaping, update
# ---------------------------------------------------------------------------------------------
def member_seeds(seed: int, generation: int, n: int) -> np.ndarray:
    """One integer per member; everything random in a generation derives from these."""
    return np.random.default_rng([seed, generation]).integers(0, 2**31 - 1, size=n)


def noise_generator(member_seed: int, tensor_index: int) -> torch.Generator:
    # An independent stream per (member, tensor): SeedSequence mixes the pair into a fresh state.
    state = np.random.SeedSequence([int(member_seed), int(tensor_index)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def sample_eps(params, member_seed: int):
    """eps for every parameter tensor, regenerated identically from the seed on every call."""
    return [torch.randn(p.shape, generator=noise_generator(member_seed, k), dtype=p.dtype) for k, p in enumerate(params)]


def active_factor(generation: int, adapters) -> str:
    """'B' in odd generations, 'A' in even ones; 'B' while some B is still exactly zero (A would do nothing)."""
    if generation % 2 == 1 or any(not torch.any(lora.B) for lora in adapters):
        return "B"
    return "A"


def lora_theta(adapters, factor: str):
    """The tensors evolved this generation: every A, every B, or (naive) all of them."""
    return {"A": [lora.A for lora in adapters], "B": [lora.B for lora in adapters],
            "AB": [t for lora in adapters for t in (lora.A, lora.B)]}[factor]


@torch.no_grad()
def perturbation_scales(adapters, factor: str, sigma: float, normalise: bool = True):
    """s_k per evolved tensor, from the UNPERTURBED adapters; computed once per generation and kept.
    s_A = sigma / ((alpha/r) ||B||_F), s_B = sigma / ((alpha/r) ||A||_F); naive ('AB') or not normalised: sigma."""
    if factor == "AB" or not normalise:
        return [sigma] * len(lora_theta(adapters, factor))
    other = "B" if factor == "A" else "A"
    return [sigma / max(lora.scale * getattr(lora, other).norm().item(), NORM_FLOOR) for lora in adapters]


@torch.no_grad()
def perturb(params, member_seed: int, scales) -> None:
    """theta_k + s_k * eps_k for every tensor k (s_k signed for the mirrored member)."""
    for p, eps, s in zip(params, sample_eps(params, member_seed), scales):
        p.add_(s * eps)


@torch.no_grad()
def restore(params, saved) -> None:
    # Copy back instead of subtracting s*eps: (w + d) - d != w in floating point.
    for p, s in zip(params, saved):
        p.copy_(s)


def zscore(fitness: np.ndarray) -> np.ndarray:
    """(f - mean) / (std + 1e-8), and exactly zero when all fitness values are equal (never NaN).
    The equal case is checked, not left to the formula: the mean of N equal values can miss them
    in the last bit (mean([0.1] * 3) != 0.1), and that 1e-17 divided by 1e-8 is not zero."""
    fitness = np.asarray(fitness, dtype=np.float64)
    if np.all(fitness == fitness[0]):
        return np.zeros_like(fitness)
    return (fitness - fitness.mean()) / (fitness.std() + 1e-8)


def centered_ranks(fitness: np.ndarray) -> np.ndarray:
    """Rank r in 0..N-1 mapped to r/(N-1) - 0.5, so values lie in [-0.5, 0.5] and sum to zero.
    Tied fitness values share their mean rank: all-equal fitness gives exactly zero."""
    fitness = np.asarray(fitness, dtype=np.float64)
    ranks = np.empty(len(fitness))
    ranks[np.argsort(fitness, kind="stable")] = np.arange(len(fitness))
    _, tie_group = np.unique(fitness, return_inverse=True)
    ranks = (np.bincount(tie_group, ranks) / np.bincount(tie_group))[tie_group]
    return ranks / (len(fitness) - 1) - 0.5


SHAPINGS = {"zscore": zscore, "centered_rank": centered_ranks}


def es_gradient(params, seeds, weights, scales):
    """g_k = 1/(P s_k) * sum_j weights_j * eps_jk over the P pair seeds: the estimate of dF/dtheta_k
    with the scale s_k that the members were perturbed with."""
    n = len(seeds)
    grads = [torch.zeros_like(p) for p in params]
    for s, w in zip(seeds, weights):
        for g, eps in zip(grads, sample_eps(params, s)):
            g.add_(float(w) * eps)
    return [g / (n * s) for g, s in zip(grads, scales)]


# ---------------------------------------------------------------------------------------------
# The loop (es_mirrored.py's, for any choice of evolved tensors and scales)
# ---------------------------------------------------------------------------------------------
def evolve(method: str, model: nn.Module, choose, args: Args, sigma: float, lr: float, data, log_row):
    """Mirrored ES on `model`; choose(gen) -> (factor, theta, scales) says what to evolve this
    generation and with which s_k. Returns (rows, interrupted)."""
    x, y, x_test, y_test = data
    rows, evaluations, t0 = [], 0, time.perf_counter()
    test_acc = accuracy(model, x_test, y_test)
    bar = tqdm(range(1, args.generations + 1), desc=method, unit="gen")
    try:
        for gen in bar:
            factor, theta, scales = choose(gen)  # the s_k are fixed here, before any member is perturbed
            seeds = member_seeds(args.seed, gen, args.population_size // 2)  # ES: sample (one seed per pair)
            saved = [p.detach().clone() for p in theta]
            fitness = np.empty(args.population_size)  # [f_1+, f_1-, f_2+, f_2-, ...]
            for j, s in enumerate(seeds):
                for k, sign in enumerate((1.0, -1.0)):  # the same eps, mirrored
                    perturb(theta, s, [sign * sk for sk in scales])  # theta_k +/- s_k eps_jk, in place
                    fitness[2 * j + k] = fitness_of(model, x, y)
                    restore(theta, saved)  # bit-exact: copy, not subtract
            evaluations += args.population_size
            if not np.all(np.isfinite(fitness)):
                raise FloatingPointError(f"{method}, generation {gen}: non-finite fitness "
                                         f"{fitness[~np.isfinite(fitness)][:3]}; lower --sigma or --lr")
            shaped = SHAPINGS[args.shaping](fitness)  # ES: shape fitness (over all N evaluations)
            weights = (shaped[0::2] - shaped[1::2]) / 2  # pair difference: even-order terms cancel
            grad = es_gradient(theta, seeds, weights, scales)
            with torch.no_grad():
                for p, g, s in zip(theta, grad, scales):
                    # ES: update. (s/sigma)^2 = 1 for plain ES; for LoRA it is plain ES in u = (alpha/r)||B|| A
                    p.add_(lr * (s / sigma) ** 2 * g)

            logged = gen % args.eval_every == 0 or gen == args.generations
            if logged:
                test_acc = accuracy(model, x_test, y_test)
            row = dict(method=method, generation=gen, factor=factor, evaluations=evaluations,
                       fitness_mean=float(fitness.mean()), fitness_max=float(fitness.max()),
                       train_loss=-fitness_of(model, x, y), test_acc=test_acc if logged else "",
                       seconds=round(time.perf_counter() - t0, 3))
            rows.append(row)
            log_row(row)
            bar.set_postfix(fitness=f"{fitness.mean():.3f}", test_acc=f"{test_acc:.1%}")
    except KeyboardInterrupt:
        print(f"\ninterrupted during {method}: writing what we have")
        return rows, True
    return rows, False


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------
def curve_points(rows, parts: int = 4) -> str:
    """Held-out accuracy after each quarter of the budget, e.g. '2,000: 90.1%  4,000: 93.0% ...'."""
    logged = [r for r in rows if r["test_acc"] != ""]
    if not logged:
        return "-"
    picks = [min(logged, key=lambda r: abs(r["generation"] - len(rows) * q / parts)) for q in range(1, parts + 1)]
    picks = [r for i, r in enumerate(picks) if r not in picks[:i]]  # short runs: no repeats
    return "  ".join(f"{r['evaluations']:,}: {r['test_acc']:.1%}" for r in picks)


def plot_curves(runs, base_acc, base_loss, path):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, rows in runs.items():  # every curve starts at the frozen base (0 forward passes)
        ev = [r for r in rows if r["test_acc"] != ""]
        a1.plot([0] + [r["evaluations"] for r in rows], [base_loss] + [r["train_loss"] for r in rows], lw=0.9, label=method)
        a2.plot([0] + [r["evaluations"] for r in ev], [base_acc] + [r["test_acc"] for r in ev], marker=".", label=method)
    first = min(rows[0]["evaluations"] for rows in runs.values())
    for ax in (a1, a2):  # linear up to the first generation, logarithmic after: the early jump stays visible
        ax.set_xscale("symlog", linthresh=first)
        ax.set_xlabel("forward passes on the training set (log scale)")
    a1.set(ylabel="training cross-entropy (new task)", yscale="log")
    a1.legend()
    a2.axhline(base_acc, color="gray", ls="--", lw=0.8, label=f"frozen base {base_acc:.1%}")
    a2.set(ylabel="held-out accuracy (new task)", ylim=(0, 1))
    a2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_decision_boundary(model, x, y, path, title):
    grid = torch.linspace(-1.5, 1.5, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    pred = model(torch.stack([gx.flatten(), gy.flatten()], 1)).argmax(1).reshape(200, 200)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5, 2.5], alpha=0.3, cmap="viridis")
    ax.scatter(x[:400, 0], x[:400, 1], c=y[:400], s=6, cmap="viridis")
    ax.set(title=title, aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main: pretrain and freeze the base, then evolve adapters (and the references)
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # a 1k-parameter MLP gains nothing from more threads
    center = tuple(float(v) for v in args.target_center.split(","))
    x_src, y_src = make_rings(args.n_train, seed=args.seed)
    x_src_test, y_src_test = make_rings(args.n_test, seed=args.seed + 10_000)
    x, y = make_rings(args.n_train, seed=args.seed + 1, center=center)  # the new task
    x_test, y_test = make_rings(args.n_test, seed=args.seed + 10_001, center=center)

    base = pretrain(make_model(args.hidden, args.seed), x_src, y_src, args.pretrain_steps)
    base_src_acc, base_acc = accuracy(base, x_src_test, y_src_test), accuracy(base, x_test, y_test)
    print(f"base model (Adam, {args.pretrain_steps} steps), frozen: held-out accuracy {base_src_acc:.1%} on the original "
          f"task, {base_acc:.1%} on the new task (rings centred at {center})")

    layers = parse_layers(args.layers)
    model, adapters = add_lora(base, layers, args.rank, args.alpha, args.seed)
    n_base = sum(p.numel() for p in base.parameters())
    n_lora = sum(t.numel() for t in lora_theta(adapters, "AB"))
    n_a, n_b = (sum(t.numel() for t in lora_theta(adapters, f)) for f in "AB")
    print(f"base parameters: {n_base:,} (frozen) | evolved adapter parameters: {n_lora:,} ({n_lora / n_base:.1%} of the "
          f"base; a generation perturbs the {n_a} of A or the {n_b} of B) on Linear layers {layers}, rank {args.rank}, "
          f"alpha/r = {args.alpha / args.rank:g}")
    print(f"population: {args.population_size} = {args.population_size // 2} mirrored pairs | forward passes per "
          f"generation: {args.population_size} (+1 to log theta) | {args.generations * args.population_size:,} per method")

    def alternating(gen):  # the new idea: one factor per generation, s_k from the frozen factor's norm
        factor = active_factor(gen, adapters)
        return factor, lora_theta(adapters, factor), perturbation_scales(adapters, factor, args.sigma, args.normalise)

    name = "LoRA-ES (alternating)" if args.normalise else "LoRA-ES (alternating, s = sigma)"
    methods = [(name, model, alternating, args.sigma, args.lr)]
    if args.naive:
        naive_model, naive_adapters = add_lora(base, layers, args.rank, args.alpha, args.seed)  # the same A at start
        methods.append(("LoRA-ES (naive)", naive_model,
                        lambda gen: ("AB", lora_theta(naive_adapters, "AB"), perturbation_scales(naive_adapters, "AB", args.sigma)),
                        args.sigma, args.lr))
    if args.full_es:
        full_model = copy.deepcopy(base).requires_grad_(True)
        full_theta = list(full_model.parameters())
        methods.append(("full ES", full_model, lambda gen: ("W", full_theta, [args.full_sigma] * len(full_theta)),
                        args.full_sigma, args.full_lr))

    run_dir = os.path.join(args.out_dir, f"es_lora__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as fh:
        json.dump(asdict(args), fh, indent=2)
    columns = ["method", "generation", "factor", "evaluations", "fitness_mean", "fitness_max", "train_loss", "test_acc", "seconds"]
    csv_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=columns)
    writer.writeheader()

    def log_row(row):
        writer.writerow(row)
        csv_file.flush()  # an interrupted run keeps every finished generation

    summary = {"base_acc": base_acc, "base_src_acc": base_src_acc, "base": base, "run_dir": run_dir}
    try:
        for method, m, choose, sigma, lr in methods:
            t0 = time.perf_counter()
            rows, interrupted = evolve(method, m, choose, args, sigma, lr, (x, y, x_test, y_test), log_row)
            summary[method] = {"acc": accuracy(m, x_test, y_test), "src_acc": accuracy(m, x_src_test, y_src_test),
                               "seconds": time.perf_counter() - t0, "rows": rows, "model": m}
            if interrupted:
                break
    finally:
        csv_file.close()
        torch.save(model.state_dict(), os.path.join(run_dir, "model.pt"))  # base weights and adapters
        runs = {method: summary[method]["rows"] for method, *_ in methods if method in summary and summary[method]["rows"]}
        if runs:
            plot_curves(runs, base_acc, -fitness_of(base, x, y), os.path.join(run_dir, "curve.png"))
        plot_decision_boundary(model, x_test, y_test, os.path.join(run_dir, "decision_boundary.png"),
                               f"LoRA-ES, new task, held-out accuracy {accuracy(model, x_test, y_test):.1%}")

    width = max(len(method) for method, *_ in methods) + 2
    print(f"{'frozen base:':{width}} new task {base_acc:6.1%} | original task {base_src_acc:6.1%}")
    for method, *_ in methods:
        if method in summary:
            r = summary[method]
            print(f"{method + ':':{width}} new task {r['acc']:6.1%} | original task {r['src_acc']:6.1%} | "
                  f"{r['rows'][-1]['evaluations'] if r['rows'] else 0:,} forward passes, {r['seconds']:.1f} s | "
                  f"curve: {curve_points(r['rows'])}")
    print(f"run folder: {run_dir}")
    return summary


if __name__ == "__main__":
    main()
