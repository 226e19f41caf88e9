"""Rung 4: EGGROLL — low-rank noise, so a population of a thousand costs about one batched forward.

Idea
----
Plain ES (rungs 1-2) perturbs every weight matrix W (m x n) with a full Gaussian matrix: each member
needs its own copy of W, and its own m*n random numbers. EGGROLL (Sarkar et al. 2025, "Evolution
Strategies at the Hyperscale", arXiv 2511.16652) perturbs W with a rank-r matrix instead,

    E_i = A_i B_i^T / sqrt(r),    A_i (m x r), B_i (n x r), entries iid N(0, 1),

and never builds it. Member i's layer output is the shared matmul plus a thin correction,

    y_i = x_i (W + sigma E_i)^T + b + sigma e_i
        = x_i W^T + b  +  (sigma / sqrt(r)) (x_i B_i) A_i^T  +  sigma e_i

so the whole population goes through ONE batched forward: one big GEMM against the shared W
(exactly what plain batched inference does) plus a rank-r term per member costing O(r (m + n))
instead of O(m n). Biases are vectors, so they get ordinary Gaussian noise e_i (or none, with
--freeze-nonlora). The 1/sqrt(r) makes every entry of E have mean 0 and variance 1, like
full-rank noise; what differs is the shape of the distribution: the excess kurtosis of an entry
is 6/r (Gaussian: 0), and the paper proves the low-rank gradient estimate approaches the
full-rank one at rate O(1/r). Rank 1 is the paper's default and ours.

We maximise fitness (minus the cross-entropy). With z-score shaping s_i, the estimate and step are

    g = 1 / (N sigma) * sum_i s_i E_i
      = 1 / (N sigma sqrt(r)) * einsum("i,imr,inr->mn", s, A, B)     one einsum over members and rank
    theta <- theta + lr * g                        (Salimans et al. 2017, arXiv 1703.03864)

and the einsum contracts members and rank together as one (m x Nr) @ (Nr x n) product: no
[N, m, n] tensor exists anywhere, in the forward or in the update. Each E_i has rank r, but their
weighted sum has rank up to min(N r, m, n) (N r / 2 with antithetic pairs): with 4096 members
and 128-wide layers, rank-1 noise still gives a full-rank update. With antithetic pairs (members
2k and 2k+1 use +E_k and -E_k) the sum runs over the K = N/2 pairs with (s_2k - s_2k+1)/2 and
1/(K sigma), which is the same number.

Other codebases scale differently, so learning rates do not transfer. The official EGGROLL code
(as we read it) hands -sqrt(N) * mean_i(s_i * sigma * E_i) to an optax optimiser as the gradient;
with plain SGD of rate alpha that is theta += alpha sqrt(N) sigma mean_i(s_i E_i), i.e. our
lr = alpha * sqrt(N) * sigma^2. Its group normalisation divides by the global std (ours: the
group's std).

The paper reports up to 91% of pure batch-inference throughput and a hundredfold speed-up over
naive ES for billion-parameter models at large populations. bench/eggroll_throughput.py measures
the same three things on an MLP (plain inference, EGGROLL, naive full-rank ES) side by side: at
width 1024 and population 1024 on one CPU core, EGGROLL ran at 0.93x plain inference and 454x
naive ES (fresh randn noise per member; 226x when naive ES also reads a noise table).

How the noise is drawn. On a CPU, drawing the (r + 1) m + r n Gaussian numbers per member and
layer with torch.randn every generation costs a large share of the forward itself
(bench/eggroll_throughput.py shows how much). So, like OpenAI's ES (Salimans et al. 2017), we draw
one table of Gaussian numbers at start-up and read every perturbation from it: generation t picks
a random offset from (seed, t), and direction k owns the k-th consecutive slice after it, cut into
each layer's A, e and B. Slices never overlap within a generation (no two members or tensors
share a number: the pitfall of reusing one stream for every tensor), the batched forward takes
them as views (nothing is drawn or copied), and any member's noise is rebuilt from integers
(seed, generation, k) by whoever holds the table.

The task is rung 1's: points in [-1.5, 1.5]^2 in three classes (inner disk, ring, outside), now
with a 2-128-128-3 tanh MLP (17,283 parameters, 14x rung 1's) so that the matrices are big enough
for rank to matter: a rank-1 E touches a 128 x 128 matrix through 256 numbers instead of 16,384.
Large populations are what EGGROLL makes cheap, so each generation scores 4096 members (2048
antithetic pairs) on only 4 points each; members form groups of 64 that share a minibatch and are
z-scored within their group (--group-size), so 64 minibatches (256 points) inform every update.
The best model (lowest loss on the full training set at an evaluation) is kept in best.pt.

Run:   python es_eggroll.py
See:   held-out accuracy from about a third to about 92% (92.4%, 92.1%, 92.0% with seeds 0, 1, 2)
       in 250 generations, 4.1M forward passes, in well under a minute on a 2-core CPU (39 s wall,
       30 s of it in the loop, one thread, on our 2-core machine while other jobs shared it).
       --hidden 256 --sigma 0.02 --lr 0.006 (67,331 parameters) reaches 88.2% (best model 91.3%)
       in the same 250 generations and twice the time: more parameters per member need more members.
       Plots, metrics and best.pt go to runs/es_eggroll__<seed>__<time>/.
"""

import argparse
import csv
import json
import math
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

TARGET_ACC = 0.90  # held-out accuracy used to compare methods ("evaluations to reach 90%")
NOISE_TABLE_SIZE = 2**24  # Gaussian numbers drawn once (64 MB in float32); members take slices


@dataclass
class Args:
    population_size: int = field(default=4096, metadata={
        "help": "N, perturbed models evaluated per generation (even with --antithetic)"})
    rank: int = field(default=1, metadata={
        "help": "r, rank of each member's noise E = A B^T / sqrt(r) on every weight matrix"})
    sigma: float = field(default=0.01, metadata={"help": "noise scale: member i is evaluated at theta + sigma * E_i"})
    lr: float = field(default=0.003, metadata={
        "help": "step size: theta <- theta + lr * g, g = sum_i shaped_i E_i / (N sigma); z-scored fitness makes g "
                "scale as 1/sigma, so keep lr/sigma near 0.3"})
    antithetic: bool = field(default=True, metadata={
        "help": "mirrored pairs: members 2k and 2k+1 use +E_k and -E_k (--no-antithetic: N independent directions)"})
    group_size: int = field(default=64, metadata={
        "help": "0: all members see one minibatch and fitness is z-scored over the whole population; G > 0: members "
                "form consecutive groups of G (whole antithetic pairs), each group gets its own minibatch, and "
                "fitness is z-scored within each group (so a hard minibatch does not count against its members)"})
    freeze_nonlora: bool = field(default=False, metadata={
        "help": "evolve only the weight matrices (low-rank noise); biases are neither perturbed nor updated"})
    noise_reuse: int = field(default=1, metadata={
        "help": "K: generation t uses the noise of index t // K (the same table offset, so the same A, B, e for "
                "every member) for K consecutive generations; 1 = fresh noise every generation, 0 = one draw for "
                "the whole run. Same meaning as the official EGGROLL code; eggroll-trainer's 0 means fresh noise"})
    generations: int = field(default=250, metadata={"help": "number of ES updates"})
    seed: int = field(default=0, metadata={"help": "seeds data, initial weights, the noise table and every noise draw"})
    eval_every: int = field(default=10, metadata={
        "help": "held-out evaluation (and best-model check) every this many generations"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run folder"})
    hidden: int = field(default=128, metadata={"help": "width of the two hidden layers of the MLP"})
    batch_size: int = field(default=4, metadata={
        "help": "training points each member is scored on per generation (fresh minibatches every generation)"})
    n_train: int = field(default=4096, metadata={"help": "training points"})
    n_test: int = field(default=2048, metadata={"help": "held-out points for the reported accuracy"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads; on our 2-core machine shared with other jobs one thread ran 2.4x faster than "
                "two (try 2 on an idle machine)"})


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(
        description="EGGROLL: ES with low-rank noise applied inside one batched forward (arXiv 2511.16652).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(Args):
        if f.type is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, default=f.default, help=f.metadata["help"])
    args = Args(**vars(parser.parse_args(argv)))
    if args.population_size < 2:
        parser.error("--population-size must be at least 2 (shaping compares members)")
    if args.antithetic and args.population_size % 2:
        parser.error(f"--population-size must be even with --antithetic (pairs +E, -E), got {args.population_size}")
    if args.rank < 1:
        parser.error("--rank must be >= 1")
    if not (args.sigma > 0 and math.isfinite(args.sigma)):
        parser.error("--sigma must be a finite number > 0")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error("--lr must be a finite number > 0")
    if args.group_size < 0 or args.group_size == 1:
        parser.error("--group-size must be 0 (global) or >= 2 (z-scoring one member gives zero)")
    if args.group_size and args.population_size % args.group_size:
        parser.error(f"--group-size {args.group_size} must divide --population-size {args.population_size}")
    if args.group_size and args.antithetic and args.group_size % 2:
        parser.error("--group-size must be even with --antithetic (a pair must stay in one group)")
    if args.noise_reuse < 0:
        parser.error("--noise-reuse must be >= 0")
    if args.generations < 1 or args.eval_every < 1:
        parser.error("--generations and --eval-every must be >= 1")
    if min(args.hidden, args.batch_size, args.n_train, args.n_test, args.threads) < 1:
        parser.error("--hidden, --batch-size, --n-train, --n-test and --threads must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# The toy task and the model (as in rung 1, wider)
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


def linear_layers(model: nn.Module):
    """theta as a list of (W, b) pairs, one per nn.Linear, in forward order."""
    return [(m.weight, m.bias) for m in model if isinstance(m, nn.Linear)]


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


@torch.no_grad()
def loss_of(model: nn.Module, x, y) -> float:
    return F.cross_entropy(model(x), y).item()


# ---------------------------------------------------------------------------------------------
# EGGROLL building blocks: noise as table slices, the batched low-rank forward, shaping, update
# ---------------------------------------------------------------------------------------------
def noise_index(generation: int, noise_reuse: int) -> int:
    """Which noise a generation uses: K consecutive generations share it; 0 = the same forever."""
    return 0 if noise_reuse == 0 else generation // noise_reuse


def make_noise_table(seed: int, size: int = NOISE_TABLE_SIZE, dtype=torch.float32) -> torch.Tensor:
    """Gaussian numbers drawn once; every perturbation of the run is read from here."""
    state = np.random.SeedSequence([int(seed), 0x7AB1E]).generate_state(1)[0]
    return torch.randn(size, generator=torch.Generator().manual_seed(int(state)), dtype=dtype)


def noise_span(layers, rank: int, evolve_bias: bool) -> int:
    """Numbers one direction needs: per layer A (m x r), the bias noise e (m) and B (n x r)."""
    return sum(W.shape[0] * (rank + evolve_bias) + W.shape[1] * rank for W, _ in layers)


def noise_offset(seed: int, index: int, n_directions: int, span: int, table_size: int) -> int:
    """Where in the table the noise with this index starts (a random place, from (seed, index))."""
    if n_directions * span > table_size:
        raise ValueError(f"noise table ({table_size:,} numbers) is smaller than one generation's noise "
                         f"({n_directions} x {span:,}); lower the population or rank, or enlarge the table")
    return int(np.random.default_rng([seed, index]).integers(0, table_size - n_directions * span + 1))


def sample_noise(table, offset: int, n_directions: int, layers, rank: int, evolve_bias: bool):
    """The noise of K directions: per layer (At, Bt), views of the table, nothing copied or drawn.

    Direction k owns the K consecutive, disjoint slices table[offset + k*span : offset + (k+1)*span];
    inside a slice each layer gets its own pieces, stored rank-major: At (K, r + 1, m) holds A^T in
    its first r rows and the bias noise e in the last one (only A^T, (K, r, m), with frozen biases);
    Bt (K, r, n) holds B^T. Rows of length m keep the forward's batched matmul on contiguous memory
    (2-3x faster than (K, m, r) here), and e next to A lets it add the bias noise in the same matmul.
    """
    K, span = n_directions, noise_span(layers, rank, evolve_bias)
    rows = table[offset:offset + K * span].view(K, span)  # ES: sample  (K, span), a view
    noise, pos = [], 0
    for W, _ in layers:
        m, n = W.shape
        At = rows[:, pos:pos + (rank + evolve_bias) * m].view(K, rank + evolve_bias, m)  # (K, r[+1], m)
        pos += (rank + evolve_bias) * m
        Bt = rows[:, pos:pos + rank * n].view(K, rank, n)  # (K, r, n)
        pos += rank * n
        noise.append((At, Bt))
    return noise


def eggroll_linear(h, W, b, At, Bt, sigma: float, rank: int, antithetic: bool):
    """Every member's  h_i (W + sigma E_i)^T + b + sigma e_i  without building any E_i.

    h: (P, bsz, n), member i's inputs in h[i]; W: (m, n); b: (m,); At, Bt: noise of K directions.
    With antithetic pairs P = 2K and members 2k, 2k+1 share direction k with signs +, -.
    """
    P, bsz, n = h.shape
    K, rows, m = At.shape
    s = P // K  # 2 with antithetic pairs, else 1: member rows of a direction are adjacent
    out = F.linear(h, W, b)  # (P, bsz, m): x W^T + b for all members, exactly plain batched inference
    hB = torch.bmm(h.reshape(K, s * bsz, n), Bt.transpose(1, 2))  # (K, s*bsz, r): x_i B_i for every member at once
    left = hB * (sigma / math.sqrt(rank))
    if rows > rank:  # evolved bias: a column of sigma's picks up sigma * e_i from At's last row
        left = torch.cat([left, left.new_full((K, s * bsz, 1), sigma)], dim=2)  # (K, s*bsz, r+1)
    if antithetic:
        left.view(K, 2, bsz, rows)[:, 1].neg_()  # member 2k+1 is evaluated at theta - sigma E_k
    # += [(sigma/sqrt r) x B, sigma] [A, e]^T: the low-rank term and the bias noise, in place, one batched matmul
    out.view(K, s * bsz, m).baddbmm_(left, At)
    return out


def population_forward(layers, noise, x, sigma: float, rank: int, antithetic: bool):
    """Logits of all members in one batched pass: x (P, bsz, d_in) -> (P, bsz, d_out)."""
    h = x
    for k, ((W, b), (At, Bt)) in enumerate(zip(layers, noise)):
        h = eggroll_linear(h, W, b, At, Bt, sigma, rank, antithetic)
        if k < len(layers) - 1:
            h = torch.tanh_(h)  # in place: the output buffer is ours
    return h


def zscore(fitness: np.ndarray) -> np.ndarray:
    """(f - mean) / (std + 1e-8), and exactly zero when all fitness values are equal (never NaN).
    The equal case is checked, not left to the formula: the mean of N equal values can miss them
    in the last bit (mean([0.1] * 3) != 0.1), and that 1e-17 divided by 1e-8 is not zero."""
    fitness = np.asarray(fitness, dtype=np.float64)
    if np.all(fitness == fitness[0]):
        return np.zeros_like(fitness)
    return (fitness - fitness.mean()) / (fitness.std() + 1e-8)


def shape_fitness(fitness: np.ndarray, group_size: int) -> np.ndarray:
    """z-score over the population (group_size 0) or within consecutive groups of group_size."""
    fitness = np.asarray(fitness, dtype=np.float64)
    if group_size == 0:
        return zscore(fitness)
    return np.concatenate([zscore(g) for g in fitness.reshape(-1, group_size)])


def es_gradient(noise, shaped, sigma: float, rank: int, antithetic: bool):
    """g = 1/(N sigma) sum_i shaped_i E_i per layer as (gW, gb); gb is None with frozen biases.

    With pairs the sum runs over the K directions with (s_+ - s_-)/2 and 1/(K sigma): same value.
    """
    shaped = torch.as_tensor(shaped, dtype=noise[0][0].dtype)
    w = (shaped[0::2] - shaped[1::2]) / 2 if antithetic else shaped  # (K,)
    K = len(w)
    grads = []
    for At, Bt in noise:
        # contracts (K, r) together: one (m x Kr) @ (Kr x n) product, never a (K, m, n) tensor
        gW = torch.einsum("k,krm,krn->mn", w, At[:, :rank], Bt) / (K * sigma * math.sqrt(rank))
        gb = torch.einsum("k,km->m", w, At[:, rank]) / (K * sigma) if At.shape[1] > rank else None
        grads.append((gW, gb))
    return grads


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------
def plot_curves(rows, path, title):
    ev = [r for r in rows if r["test_acc"] != ""]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot([r["evaluations"] for r in rows], [-r["fitness_mean"] for r in rows], lw=0.8, label="population mean (minibatch)")
    a1.plot([r["evaluations"] for r in ev], [r["train_loss"] for r in ev], marker=".", label="theta (full training set)")
    a1.set(xlabel="forward passes (members x minibatch points)", ylabel="training cross-entropy", yscale="log", title=title)
    a1.legend()
    a2.plot([r["evaluations"] for r in ev], [r["test_acc"] for r in ev], marker=".")
    a2.axhline(TARGET_ACC, color="gray", ls="--", lw=0.8, label=f"target {TARGET_ACC:.0%}")
    a2.set(xlabel="forward passes (members x minibatch points)", ylabel="held-out accuracy", ylim=(0, 1))
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
# The loop
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = make_rings(args.n_train, seed=args.seed)
    x_test, y_test = make_rings(args.n_test, seed=args.seed + 10_000)
    model = make_model(args.hidden, args.seed)
    layers = linear_layers(model)
    evolve_bias = not args.freeze_nonlora
    N, r = args.population_size, args.rank
    K = N // 2 if args.antithetic else N  # noise directions per generation
    n_params = sum(p.numel() for p in model.parameters())
    n_evolved = sum(W.numel() + (b.numel() if evolve_bias else 0) for W, b in layers)
    span = noise_span(layers, r, evolve_bias)
    n_groups = N // args.group_size if args.group_size else 1
    print(f"parameters: {n_params:,} ({n_evolved:,} evolved) | population: {N} "
          f"({K} {'antithetic pairs' if args.antithetic else 'independent directions'}) | rank: {r}")
    print(f"forward passes per generation: {N} members x {args.batch_size} points = {N * args.batch_size:,} "
          f"in one batched pass | minibatches per generation: {n_groups}")
    print(f"noise numbers per member: {span:,} (full-rank ES would need {n_evolved:,}; "
          f"{n_evolved / span:.0f}x more)")

    table = make_noise_table(args.seed, size=max(NOISE_TABLE_SIZE, 2 * K * span))
    run_dir = os.path.join(args.out_dir, f"es_eggroll__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as fh:
        json.dump(asdict(args), fh, indent=2)
    columns = ["generation", "evaluations", "fitness_mean", "fitness_max", "train_loss", "test_acc", "seconds"]
    csv_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=columns)
    writer.writeheader()

    data_rng = np.random.default_rng([args.seed, 1])  # minibatch indices, separate from noise
    rows, evaluations, reached, t0 = [], 0, None, time.perf_counter()
    best_loss, best_gen = loss_of(model, x, y), 0
    torch.save(model.state_dict(), os.path.join(run_dir, "best.pt"))
    test_acc = accuracy(model, x_test, y_test)
    bar = tqdm(range(1, args.generations + 1), desc="es_eggroll", unit="gen")
    try:
        with torch.no_grad():
            for gen in bar:
                offset = noise_offset(args.seed, noise_index(gen, args.noise_reuse), K, span, table.numel())
                noise = sample_noise(table, offset, K, layers, r, evolve_bias)  # ES: sample (K directions)
                idx = torch.from_numpy(data_rng.integers(0, args.n_train, size=(n_groups, args.batch_size)))
                xb = x[idx].repeat_interleave(N // n_groups, dim=0)  # (N, bsz, 2): a group shares its minibatch
                yb = y[idx].repeat_interleave(N // n_groups, dim=0)  # (N, bsz)
                logits = population_forward(layers, noise, xb, args.sigma, r, args.antithetic)  # (N, bsz, 3)
                fitness = -F.cross_entropy(logits.reshape(-1, 3), yb.reshape(-1), reduction="none").view(N, -1).mean(1)
                fitness = fitness.double().numpy()
                if not np.isfinite(fitness).all():
                    raise FloatingPointError(f"non-finite fitness at generation {gen}: the weights diverged; "
                                             f"lower --lr or --sigma")
                evaluations += N * args.batch_size
                shaped = shape_fitness(fitness, args.group_size)  # ES: shape fitness
                grads = es_gradient(noise, shaped, args.sigma, r, args.antithetic)
                for (W, b), (gW, gb) in zip(layers, grads):
                    W.add_(args.lr * gW)  # ES: update  theta <- theta + lr * g
                    if gb is not None:
                        b.add_(args.lr * gb)

                logged = gen % args.eval_every == 0 or gen == args.generations
                train_loss = ""
                if logged:
                    test_acc, train_loss = accuracy(model, x_test, y_test), loss_of(model, x, y)
                    if reached is None and test_acc >= TARGET_ACC:
                        reached = evaluations
                    if train_loss < best_loss:  # best by training loss: the held-out set stays untouched
                        best_loss, best_gen = train_loss, gen
                        torch.save(model.state_dict(), os.path.join(run_dir, "best.pt"))
                row = dict(generation=gen, evaluations=evaluations, fitness_mean=float(fitness.mean()),
                           fitness_max=float(fitness.max()), train_loss=train_loss,
                           test_acc=test_acc if logged else "", seconds=round(time.perf_counter() - t0, 3))
                rows.append(row)
                writer.writerow(row)
                csv_file.flush()  # an interrupted run keeps every finished generation
                bar.set_postfix(fitness=f"{fitness.mean():.3f}", test_acc=f"{test_acc:.1%}")
    except KeyboardInterrupt:
        print("\ninterrupted: writing what we have")
    finally:
        csv_file.close()
        es_seconds = time.perf_counter() - t0
        torch.save(model.state_dict(), os.path.join(run_dir, "model.pt"))
        if rows:
            plot_curves(rows, os.path.join(run_dir, "curve.png"), f"EGGROLL, N={N}, rank {r}")
        plot_decision_boundary(model, x_test, y_test, os.path.join(run_dir, "decision_boundary.png"),
                               f"EGGROLL, held-out accuracy {accuracy(model, x_test, y_test):.1%}")

    final_acc = accuracy(model, x_test, y_test)
    best = make_model(args.hidden, args.seed)
    best.load_state_dict(torch.load(os.path.join(run_dir, "best.pt")))
    best_acc = accuracy(best, x_test, y_test)
    print(f"EGGROLL: held-out accuracy {final_acc:.1%} after {len(rows)} generations, {evaluations:,} forward passes, "
          f"{es_seconds:.1f} s; reached {TARGET_ACC:.0%} after "
          + (f"{reached:,} forward passes" if reached else "-- (not reached)"))
    print(f"best model (lowest training loss {best_loss:.4f}, generation {best_gen}): held-out accuracy {best_acc:.1%}, "
          f"saved to best.pt")
    print(f"run folder: {run_dir}")
    return {"final_acc": final_acc, "best_acc": best_acc, "reached": reached, "rows": rows, "run_dir": run_dir}


if __name__ == "__main__":
    main()
