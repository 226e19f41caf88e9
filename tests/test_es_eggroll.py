"""Tests for es_eggroll.py: the fast low-rank path against slow materialised references."""

import csv
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import es_eggroll as E


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    # torch.testing.assert_close would import torch.distributed (~10 s on a busy 2-core machine)
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max()


def tiny_layers(sizes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, n, generator=g, dtype=dtype) / math.sqrt(n), 0.1 * torch.randn(m, generator=g, dtype=dtype))
            for n, m in zip(sizes[:-1], sizes[1:])]


def members_E(noise, rank, antithetic):
    """Reference: every member's materialised (E_i, e_i) per layer, signs included."""
    out = []
    for At, Bt in noise:  # At (K, r[+1], m) = A^T and e; Bt (K, r, n) = B^T
        E_dir = torch.einsum("krm,krn->kmn", At[:, :rank], Bt) / math.sqrt(rank)  # (K, m, n): fine at test sizes
        e_dir = At[:, rank] if At.shape[1] > rank else None
        if antithetic:  # members 2k, 2k+1 = +E_k, -E_k
            E_dir = torch.stack([E_dir, -E_dir], 1).flatten(0, 1)
            e_dir = None if e_dir is None else torch.stack([e_dir, -e_dir], 1).flatten(0, 1)
        out.append((E_dir, e_dir))
    return out


def materialised_forward(layers, E_members, x, sigma):
    """Slow reference: for each member build W + sigma*E_i (and b + sigma*e_i) and run it."""
    outs = []
    for i in range(x.shape[0]):
        h = x[i]
        for k, ((W, b), (E_all, e_all)) in enumerate(zip(layers, E_members)):
            b_i = b if e_all is None else b + sigma * e_all[i]
            h = F.linear(h, W + sigma * E_all[i], b_i)
            if k < len(layers) - 1:
                h = torch.tanh(h)
        outs.append(h)
    return torch.stack(outs)


def make_noise(layers, K, rank, evolve_bias, seed=0, dtype=torch.float64):
    span = E.noise_span(layers, rank, evolve_bias)
    table = E.make_noise_table(seed, size=4 * K * span, dtype=dtype)
    return E.sample_noise(table, E.noise_offset(seed, 1, K, span, table.numel()), K, layers, rank, evolve_bias)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("evolve_bias", [True, False])
def test_fast_forward_equals_materialised(rank, antithetic, evolve_bias):
    layers = tiny_layers([5, 7, 6, 3])
    P, bsz, sigma = 6, 4, 0.3
    K = P // 2 if antithetic else P
    noise = make_noise(layers, K, rank, evolve_bias)
    x = torch.randn(P, bsz, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast = E.population_forward(layers, noise, x, sigma, rank, antithetic)
    slow = materialised_forward(layers, members_E(noise, rank, antithetic), x, sigma)
    assert fast.shape == (P, bsz, 3)
    assert_close(fast, slow)
    unperturbed = materialised_forward(layers, [(torch.zeros(P, W.shape[0], W.shape[1], dtype=W.dtype), None)
                                                for W, _ in layers], x, sigma)
    assert (fast - unperturbed).abs().max() > 1e-2  # the noise really acts
    if antithetic:  # the pair's outputs straddle the unperturbed output (first order)
        assert not torch.allclose(fast[0], fast[1])


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("antithetic", [True, False])
def test_einsum_update_equals_explicit_sum(rank, antithetic):
    layers = tiny_layers([4, 9, 5])
    N, sigma = 10, 0.05
    K = N // 2 if antithetic else N
    noise = make_noise(layers, K, rank, True)
    shaped = np.random.default_rng(3).standard_normal(N)
    grads = E.es_gradient(noise, shaped, sigma, rank, antithetic)
    for (gW, gb), (E_all, e_all) in zip(grads, members_E(noise, rank, antithetic)):
        ref_W = sum(float(shaped[i]) * E_all[i] for i in range(N)) / (N * sigma)  # g = 1/(N sigma) sum_i s_i E_i
        ref_b = sum(float(shaped[i]) * e_all[i] for i in range(N)) / (N * sigma)
        assert_close(gW, ref_W)
        assert_close(gb, ref_b)
    zero = E.es_gradient(noise, E.zscore(np.full(N, 2.5)), sigma, rank, antithetic)  # all-equal fitness
    assert all(torch.equal(gW, torch.zeros_like(gW)) and torch.equal(gb, torch.zeros_like(gb)) for gW, gb in zero)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_population_by_matrix_tensor_in_forward_or_update():
    layers = tiny_layers([8, 64, 64, 3], dtype=torch.float32)
    P, bsz, rank = 64, 2, 2
    K = P // 2
    span = E.noise_span(layers, rank, True)
    table = E.make_noise_table(0, size=2 * K * span)
    x = torch.randn(P, bsz, 8)
    with LargestTensor() as rec:
        noise = E.sample_noise(table, E.noise_offset(0, 1, K, span, table.numel()), K, layers, rank, True)
        fitness = E.population_forward(layers, noise, x, 0.1, rank, True).sum((1, 2)).numpy()
        E.es_gradient(noise, E.zscore(fitness), 0.1, rank, True)
    limit = K * 64 * 64  # one (directions, m, n) tensor for the 64 x 64 layer
    assert rec.largest < limit / 4, rec.largest
    with LargestTensor() as rec_naive:  # the recorder does see a materialised population of E's
        members_E(noise, rank, True)
    assert rec_naive.largest >= limit


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_entries_of_E_have_unit_variance_and_kurtosis_6_over_r(rank):
    # E exactly as the script applies it, read back from its forward: a layer with W = 0, b = 0 fed
    # the identity gives member i the rows sigma * E_i[:, j]. No 1/sqrt(r) is written in this test.
    m = n = 3
    layers = [(torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64))]
    K, sigma = 120_000 // rank, 0.5  # about 1.1M entries per rank
    noise = make_noise(layers, K, rank, False, seed=rank)
    eye = torch.eye(n, dtype=torch.float64).expand(K, n, n)
    E_fwd = E.eggroll_linear(eye, *layers[0], *noise[0], sigma, rank, antithetic=False).transpose(1, 2) / sigma
    # the update uses the same E: with one member's shaped fitness 1 and all others 0, g = E_i / (N sigma)
    for i in (0, 1, K - 1):
        onehot = np.zeros(K)
        onehot[i] = 1.0
        gW, _ = E.es_gradient(noise, onehot, sigma, rank, antithetic=False)[0]
        assert_close(gW * (K * sigma), E_fwd[i])
    e = E_fwd.flatten().numpy()
    mean, var = e.mean(), e.var()
    excess_kurtosis = ((e - mean) ** 4).mean() / var**2 - 3
    assert abs(mean) < 0.015
    assert abs(var - 1) < 0.03  # the 1/sqrt(r): without it the variance would be r
    # exactly 6/r for Gaussian A, B (0 for Gaussian noise, -2/r for random signs): the distance
    # from Gaussian noise shrinks as 1/r
    assert abs(excess_kurtosis - 6 / rank) < 0.15 * 6 / rank + 0.03, excess_kurtosis


def smooth_objective(params, x, y):
    """-mean squared error of a 8-32-4 tanh net to targets: smooth, not quadratic in the weights."""
    (W1, b1), (W2, b2) = params
    return -((torch.tanh(x @ W1.T + b1) @ W2.T + b2 - y) ** 2).mean()


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_low_rank_estimate_as_aligned_with_true_gradient_as_full_rank():
    g = torch.Generator().manual_seed(5)
    layers = tiny_layers([8, 32, 4], seed=5)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = torch.sin(3 * x[:, :4]) + x[:, 4:] ** 2
    params = [(W.clone().requires_grad_(), b.clone().requires_grad_()) for W, b in layers]
    smooth_objective(params, x, y).backward()
    true = torch.cat([t.grad.flatten() for pair in params for t in pair])
    N, sigma, rank = 4096, 1e-3, 1
    K = N // 2
    flat = lambda grads: torch.cat([t.flatten() for pair in grads for t in pair])  # noqa: E731

    def fitness_of(logits):
        return -((logits - y) ** 2).mean((1, 2)).numpy()

    cos_low, cos_full = [], []
    for seed in range(3):
        noise = make_noise(layers, K, rank, True, seed=seed)
        logits = E.population_forward(layers, noise, x.expand(N, -1, -1), sigma, rank, True)
        cos_low.append(cosine(flat(E.es_gradient(noise, E.zscore(fitness_of(logits)), sigma, rank, True)), true))
        # full-rank reference at the same population: eps ~ N(0, I) for every parameter, mirrored pairs
        gen = torch.Generator().manual_seed(100 + seed)
        eps = [(torch.randn(K, *W.shape, generator=gen, dtype=W.dtype), torch.randn(K, *b.shape, generator=gen, dtype=b.dtype))
               for W, b in layers]
        sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(K)[:, None, None]
        h = x
        for k, ((W, b), (eW, eb)) in enumerate(zip(layers, eps)):
            Wi = W + sigma * sign * eW.repeat_interleave(2, 0)  # (N, m, n): fine for a 420-parameter net
            bi = b + sigma * sign[:, :, 0] * eb.repeat_interleave(2, 0)
            h = torch.einsum("pbn,pmn->pbm", h.expand(N, -1, -1), Wi) + bi[:, None, :]
            h = torch.tanh(h) if k == 0 else h
        shaped = torch.as_tensor(E.zscore(fitness_of(h)))
        w = (shaped[0::2] - shaped[1::2]) / 2
        full = torch.cat([torch.einsum("k,k...->...", w, t).flatten() / (K * sigma) for pair in eps for t in pair])
        cos_full.append(cosine(full, true))
    low, full = np.mean(cos_low), np.mean(cos_full)
    print(f"cosine to the true gradient: low-rank {low:.3f}, full-rank {full:.3f}")
    assert full > 0.5  # the comparison means something: both estimates see the gradient
    assert abs(low - full) < 0.05, (cos_low, cos_full)


def test_group_shaping_normalises_within_each_group():
    rng = np.random.default_rng(0)
    fitness = rng.standard_normal(32) + np.repeat([0.0, 5.0, -3.0, 10.0], 8)  # groups differ in level
    shaped = E.shape_fitness(fitness, 8).reshape(4, 8)
    np.testing.assert_allclose(shaped.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(shaped.std(1), 1, atol=1e-6)
    global_shaped = E.shape_fitness(fitness, 0).reshape(4, 8)
    assert np.abs(global_shaped.mean(1)).max() > 0.5  # global z-scoring keeps the level differences
    assert np.array_equal(E.shape_fitness(np.full(16, 3.0), 4), np.zeros(16))


def test_noise_reuse_keeps_noise_for_k_generations():
    assert [E.noise_index(t, 3) for t in range(1, 8)] == [0, 0, 1, 1, 1, 2, 2]
    assert {E.noise_index(t, 0) for t in range(1, 50)} == {0}
    assert [E.noise_index(t, 1) for t in range(1, 4)] == [1, 2, 3]


def test_noise_is_disjoint_between_directions_and_tensors():
    layers = tiny_layers([3, 4, 2])
    noise = make_noise(layers, 5, 2, True)
    pieces = torch.cat([t.reshape(5, -1) for pair in noise for t in pair], 1)  # (K, span)
    values = pieces.flatten()
    assert values.unique().numel() == values.numel()  # no number used twice in one generation


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as fh:
        return list(csv.DictReader(fh))


def test_end_to_end_tiny_run_improves_fitness(tmp_path):
    flags = ["--population-size", "1024", "--hidden", "32", "--group-size", "32", "--generations", "100",
             "--sigma", "0.03", "--lr", "0.03", "--eval-every", "20", "--out-dir", str(tmp_path), "--seed", "1"]
    res = E.main(flags)
    rows = read_metrics(res["run_dir"])
    first, last = float(rows[0]["fitness_mean"]), np.mean([float(r["fitness_mean"]) for r in rows[-5:]])
    assert last > first + 0.4, (first, last)  # the population's mean cross-entropy fell by > 0.4 nats
    assert res["final_acc"] > 0.7  # from about a third (chance) to well above it
    for name in ("args.json", "metrics.csv", "curve.png", "decision_boundary.png", "best.pt", "model.pt"):
        assert os.path.exists(os.path.join(res["run_dir"], name)), name


def test_freeze_nonlora_leaves_biases_bit_identical(tmp_path):
    res = E.main(["--population-size", "64", "--hidden", "32", "--generations", "3", "--batch-size", "8",
                  "--freeze-nonlora", "--group-size", "16", "--out-dir", str(tmp_path)])
    before = E.make_model(32, 0).state_dict()
    after = torch.load(os.path.join(res["run_dir"], "model.pt"))
    for name in before:
        if name.endswith("bias"):
            assert torch.equal(before[name], after[name]), name
        else:
            assert not torch.equal(before[name], after[name]), name


def test_diverged_weights_stop_with_a_clear_error(tmp_path):
    # lr 1e38 overflows float32 weights to inf: the fitness turns NaN and the run must say so
    with pytest.raises(FloatingPointError, match="non-finite fitness"):
        E.main(["--population-size", "64", "--hidden", "16", "--generations", "5", "--lr", "1e38",
                "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("flags", [["--population-size", "7"],
                                   ["--population-size", "8", "--group-size", "3", "--no-antithetic"],
                                   ["--population-size", "12", "--group-size", "3"],
                                   ["--group-size", "1"], ["--sigma", "0"], ["--lr", "nan"], ["--rank", "0"],
                                   ["--noise-reuse", "-1"]])
def test_bad_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit):
        E.parse_args(flags)
    assert "error" in capsys.readouterr().err


def test_zscore_all_equal_is_exactly_zero_for_values_that_are_not_binary_fractions():
    # mean([0.1] * 3) misses 0.1 in the last bit; (f - mean) / (std + 1e-8) alone gave 1.4e-9
    for values in ([0.1] * 4, [1.1] * 32, [-0.7] * 64, [1e6 / 3] * 8):
        assert np.all(E.zscore(np.array(values)) == 0.0), values[0]
        assert np.all(E.shape_fitness(np.array(values), 4) == 0.0), values[0]
    mixed = np.array([1.1] * 4 + [0.3, 0.7, 0.1, 0.9])  # one all-equal group, one not
    assert np.all(E.shape_fitness(mixed, 4)[:4] == 0.0) and np.all(E.shape_fitness(mixed, 4)[4:] != 0.0)


# ---------------------------------------------------------------------------------------------
# Oracle: whole generations of es_eggroll.main recomputed here the slow way, from the docstring:
# the table and offsets rebuilt by hand, E_i = A_i B_i^T / sqrt(r) materialised, member i run with
# W + sign_i sigma E_i (and b + sign_i sigma e_i), z-scored per group, g = 1/(N sigma) sum_i s_i
# sign_i E_i, theta += lr g; compared elementwise with the weights main() saved.
# ---------------------------------------------------------------------------------------------
def oracle_direction(table, offset, k, shapes, rank, evolve_bias):
    """Direction k's (E, e) per layer from its slice: per layer A^T (r x m), [e (m)], B^T (r x n)."""
    span = sum(m * (rank + evolve_bias) + n * rank for m, n in shapes)
    piece, pos, out = table[offset + k * span: offset + (k + 1) * span].double(), 0, []
    for m, n in shapes:
        A = piece[pos:pos + rank * m].reshape(rank, m).T  # (m, r)
        pos += rank * m
        e = None
        if evolve_bias:
            e = piece[pos:pos + m]
            pos += m
        B = piece[pos:pos + rank * n].reshape(rank, n).T  # (n, r)
        pos += rank * n
        out.append((A @ B.T / math.sqrt(rank), e))  # E = A B^T / sqrt(r)
    return out, span


@pytest.mark.parametrize("N,rank,antithetic,group,freeze,reuse,gens", [
    (8, 2, True, 4, False, 1, 2),
    (6, 3, False, 0, False, 2, 3),
    (8, 1, True, 0, True, 1, 2),
])
def test_oracle_generations_of_main_match_the_docstring_formula(tmp_path, N, rank, antithetic, group, freeze,
                                                                reuse, gens):
    seed, sigma, lr, hidden, bsz, n_train = 4, 0.05, 0.02, 6, 3, 64
    flags = ["--seed", str(seed), "--population-size", str(N), "--rank", str(rank), "--sigma", str(sigma),
             "--lr", str(lr), "--group-size", str(group), "--noise-reuse", str(reuse), "--generations", str(gens),
             "--hidden", str(hidden), "--batch-size", str(bsz), "--n-train", str(n_train), "--n-test", "32",
             "--eval-every", str(gens), "--out-dir", str(tmp_path),
             "--antithetic" if antithetic else "--no-antithetic"] + (["--freeze-nonlora"] if freeze else [])
    res = E.main(flags)
    x, y = E.make_rings(n_train, seed=seed)
    layers = [[m.weight.detach().double(), m.bias.detach().double()] for m in E.make_model(hidden, seed)
              if isinstance(m, torch.nn.Linear)]
    start = [t.clone() for pair in layers for t in pair]
    shapes = [tuple(W.shape) for W, _ in layers]
    state = int(np.random.SeedSequence([seed, 0x7AB1E]).generate_state(1)[0])
    table = torch.randn(E.NOISE_TABLE_SIZE, generator=torch.Generator().manual_seed(state))
    K = N // 2 if antithetic else N
    groups = N // group if group else 1
    data_rng = np.random.default_rng([seed, 1])
    for gen in range(1, gens + 1):
        _, span = oracle_direction(table, 0, 0, shapes, rank, not freeze)
        offset = int(np.random.default_rng([seed, gen // reuse]).integers(0, table.numel() - K * span + 1))
        dirs = [oracle_direction(table, offset, k, shapes, rank, not freeze)[0] for k in range(K)]
        idx = data_rng.integers(0, n_train, size=(groups, bsz))
        fitness, members = [], []
        for i in range(N):
            k, sign = (i // 2, (1.0, -1.0)[i % 2]) if antithetic else (i, 1.0)
            rows = idx[i // (N // groups)]
            h = x[rows].double()
            for li, ((W, b), (Ek, ek)) in enumerate(zip(layers, dirs[k])):
                h = h @ (W + sign * sigma * Ek).T + (b if freeze else b + sign * sigma * ek)
                h = torch.tanh(h) if li < len(layers) - 1 else h
            fitness.append(-F.cross_entropy(h, y[rows]).item())
            members.append((k, sign))
        f = np.array(fitness).reshape(groups, -1)
        s = ((f - f.mean(1, keepdims=True)) / (f.std(1, keepdims=True) + 1e-8)).flatten()  # z-score per group
        for li, (W, b) in enumerate(layers):
            gW = sum(s[i] * sign * dirs[k][li][0] for i, (k, sign) in enumerate(members)) / (N * sigma)
            layers[li][0] = W + lr * gW
            if not freeze:
                gb = sum(s[i] * sign * dirs[k][li][1] for i, (k, sign) in enumerate(members)) / (N * sigma)
                layers[li][1] = b + lr * gb
    saved = torch.load(os.path.join(res["run_dir"], "model.pt"))
    for (name, got), want, old in zip(saved.items(), [t for pair in layers for t in pair], start):
        moved = (want - old).abs().max().item()
        if freeze and name.endswith("bias"):
            assert torch.equal(got.double(), old), name
            continue
        assert moved > 1e-2, (name, moved)  # every tensor moved, far beyond the tolerance
        err = (got.double() - want).abs().max().item()
        assert err < 5e-5 * moved + 1e-7, (name, err, moved)
