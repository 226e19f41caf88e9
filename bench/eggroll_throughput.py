"""Throughput of EGGROLL against plain batched inference and naive full-rank ES, side by side.

Question: how many population members per second can we evaluate, compared with running the
unperturbed model on the same inputs (the ceiling), and with naive ES that materialises each
member's full-rank perturbed weights W + sigma * eps_i?

Model: `--layers` square linear layers of width w with tanh between them (biases included and
perturbed). Input: one random tensor (population, `--batch`, w), the same for every method; each
member sees its own `--batch` rows, as in RL (one observation per member) or LLM decoding (one
token per sequence), where the paper measures. Methods, timed in interleaved rounds so that load
from other processes hits all of them alike (we report the fastest round of each):

- plain:         the unperturbed model on all members' inputs: one GEMM per layer.
- EGGROLL:       es_eggroll.population_forward, noise as views of the Gaussian table (the script's
                 path), noise lookup included.
- EGGROLL randn: the same forward with A, B, e drawn by torch.randn every generation (to show what
                 fresh noise generation costs on a CPU).
- naive randn:   per member, W_i = W + sigma * randn(m, n) for every layer, then its forward.
- naive table:   the same with eps_i read from the noise table (no generation, still materialised).
Naive ES is timed on `--naive-members` members and extrapolated linearly to the population (each
member costs the same), which the output says.

Clock: by default one thread and process CPU time. On a machine shared with other jobs, wall time
swings by 10x between rounds and two threads wait for each other whenever one is descheduled; the
CPU time of one thread is what the work costs. `--threads 2 --clock wall` measures elapsed time on
both cores of an idle machine.

Run:   python bench/eggroll_throughput.py
See:   a markdown table of members/second and ratios; targets at width 1024, population 1024:
       EGGROLL >= 0.9x plain inference and >= 100x naive ES.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import es_eggroll  # noqa: E402  (the repository root holds the scripts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 1024], help="layer widths w to measure")
    p.add_argument("--populations", type=int, nargs="+", default=[256, 1024, 4096], help="population sizes N (even: antithetic pairs)")
    p.add_argument("--layers", type=int, default=3, help="square w x w linear layers, tanh between them")
    p.add_argument("--batch", type=int, default=1, help="input rows per member")
    p.add_argument("--rank", type=int, default=1, help="EGGROLL noise rank r")
    p.add_argument("--sigma", type=float, default=0.01, help="noise scale (does not change the cost)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds; the fastest of each method is reported")
    p.add_argument("--naive-members", type=int, default=8, help="members timed for naive ES (extrapolated to N)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: process CPU time (with 1 thread, immune to other jobs taking the core away); "
                        "wall: elapsed time (use with --threads 2 on an idle machine)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and noise")
    args = p.parse_args(argv)
    if any(n < 2 or n % 2 for n in args.populations):
        p.error("--populations must be even numbers >= 2 (antithetic pairs)")
    if min(args.widths) < 1 or args.layers < 1 or args.batch < 1 or args.rank < 1 or args.rounds < 1 or args.naive_members < 1:
        p.error("--widths, --layers, --batch, --rank, --rounds and --naive-members must be >= 1")
    return args


def plain_forward(layers, x):
    h = x
    for k, (W, b) in enumerate(layers):
        h = F.linear(h, W, b)
        if k < len(layers) - 1:
            h = torch.tanh_(h)
    return h


def randn_noise(gen, K, layers, rank):
    """Same layout as es_eggroll.sample_noise, drawn fresh: At (K, r+1, m), Bt (K, r, n)."""
    return [(torch.randn(K, rank + 1, W.shape[0], generator=gen), torch.randn(K, rank, W.shape[1], generator=gen))
            for W, _ in layers]


def naive_member_forward(layers, x_i, sigma, eps_fn):
    """Naive full-rank ES for one member: materialise W + sigma*eps, then the member's forward."""
    h = x_i
    for k, (W, b) in enumerate(layers):
        eps_W, eps_b = eps_fn(k, W, b)
        h = F.linear(h, W + sigma * eps_W, b + sigma * eps_b)
        if k < len(layers) - 1:
            h = torch.tanh_(h)
    return h


def measure(width, N, args, table):
    torch.manual_seed(args.seed)
    layers = [(torch.randn(width, width) / math.sqrt(width), 0.1 * torch.randn(width)) for _ in range(args.layers)]
    x = torch.randn(N, args.batch, width)
    K, r, sigma = N // 2, args.rank, args.sigma
    span = es_eggroll.noise_span(layers, r, True)
    gen = torch.Generator().manual_seed(args.seed)
    n_naive = min(args.naive_members, N)
    full = sum(W.numel() + b.numel() for W, b in layers)

    def eggroll_table():
        offset = es_eggroll.noise_offset(args.seed, 1, K, span, table.numel())
        noise = es_eggroll.sample_noise(table, offset, K, layers, r, True)
        return es_eggroll.population_forward(layers, noise, x, sigma, r, True)

    def eggroll_randn():
        return es_eggroll.population_forward(layers, randn_noise(gen, K, layers, r), x, sigma, r, True)

    def naive_randn():
        def eps(k, W, b):
            return torch.randn(W.shape, generator=gen), torch.randn(b.shape, generator=gen)
        for i in range(n_naive):
            naive_member_forward(layers, x[i], sigma if i % 2 == 0 else -sigma, eps)

    def naive_table():
        for i in range(n_naive):
            start = (i // 2) * full  # member pairs share a slice, as in EGGROLL

            def eps(k, W, b, start=start):
                pos = start + sum(w.numel() + c.numel() for w, c in layers[:k])
                return table[pos:pos + W.numel()].view(W.shape), table[pos + W.numel():pos + W.numel() + b.numel()]
            naive_member_forward(layers, x[i], sigma if i % 2 == 0 else -sigma, eps)

    methods = {"plain": lambda: plain_forward(layers, x), "eggroll": eggroll_table, "eggroll_randn": eggroll_randn,
               "naive_randn": naive_randn, "naive_table": naive_table}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    best = {name: float("inf") for name in methods}
    with torch.no_grad():
        for f in methods.values():  # warm-up (allocations, library dispatch)
            f()
        for _ in range(args.rounds):
            for name, f in methods.items():
                t0 = clock()
                f()
                best[name] = min(best[name], clock() - t0)
    rate = {name: N / t for name, t in best.items()}
    for name in ("naive_randn", "naive_table"):
        rate[name] = n_naive / best[name]  # per-member rate, valid for any N
    return rate, n_naive


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    need = max(w * (args.rank + 1) + w * args.rank for w in args.widths) * args.layers * max(args.populations) // 2
    full = (args.naive_members // 2 + 1) * (max(args.widths) ** 2 + max(args.widths)) * args.layers
    table = es_eggroll.make_noise_table(args.seed, size=max(es_eggroll.NOISE_TABLE_SIZE, need, full))
    print(f"{args.layers} tanh layers of width w, {args.batch} input row(s) per member, rank {args.rank}, antithetic pairs, "
          f"{args.threads} thread(s), {args.clock} clock, fastest of {args.rounds} interleaved rounds; naive ES timed on "
          f"{args.naive_members} members and extrapolated (members/s is per-member cost, independent of N)\n")
    print("| width | population | plain members/s | EGGROLL members/s | EGGROLL / plain | EGGROLL (randn noise) / plain "
          "| naive (randn) members/s | EGGROLL / naive (randn) | EGGROLL / naive (table) |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for width in args.widths:
        for N in args.populations:
            rate, n_naive = measure(width, N, args, table)
            results.append((width, N, rate))
            print(f"| {width} | {N} | {rate['plain']:,.0f} | {rate['eggroll']:,.0f} | {rate['eggroll'] / rate['plain']:.2f}x "
                  f"| {rate['eggroll_randn'] / rate['plain']:.2f}x | {rate['naive_randn']:,.0f} "
                  f"| {rate['eggroll'] / rate['naive_randn']:,.0f}x | {rate['eggroll'] / rate['naive_table']:,.0f}x |",
                  flush=True)
    return results


if __name__ == "__main__":
    main()
