"""Properties of rung 3 (es_lora.py): the adapter layer, the B = 0 start, exact restore with the
normalised scales, the estimate against autograd, scale invariance, and a run that beats the base."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import es_lora as es


@pytest.fixture(autouse=True)
def one_thread():
    # As the scripts do: tiny tensors gain nothing from threads, and on a busy machine they spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_lora(seed=0, rank=2, alpha=4.0, random_B=True, dtype=torch.float32):
    """A 2-8-8-3 base with adapters on all three Linear layers; B random unless asked otherwise."""
    base = es.make_model(8, seed).to(dtype).requires_grad_(False)
    model, adapters = es.add_lora(base, [0, 1, 2], rank, alpha, seed)
    if random_B:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for lora in adapters:
                lora.B.copy_(torch.randn(lora.B.shape, generator=g, dtype=dtype))
    return base, model, adapters


def test_adapter_layer_equals_dense_layer_with_merged_weight():
    base, model, adapters = tiny_lora(rank=3, alpha=5.0)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    lora = adapters[1]
    h = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    merged = lora.base.weight + (5.0 / 3) * lora.B @ lora.A  # W + (alpha/r) B A
    torch.testing.assert_close(lora(h), F.linear(h, merged, lora.base.bias))
    # the whole network: every adapted layer replaced by its dense equivalent
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for i, lora in zip([0, 2, 4], adapters):
            dense[i].weight.add_(lora.scale * lora.B @ lora.A)
    torch.testing.assert_close(model(x), dense(x))
    assert not torch.allclose(model(x), base(x), atol=1e-3), "random B must change the output"
    # only the adapters are trainable; the base inside the adapted model is frozen
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"A", "B"}


def test_with_B_zero_perturbing_A_changes_nothing_and_perturbing_B_does():
    _, model, adapters = tiny_lora(random_B=False)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(5))
    before = model(x)
    for factor in ("A", "B"):
        theta = es.lora_theta(adapters, factor)
        saved = [t.detach().clone() for t in theta]
        es.perturb(theta, 1234, [0.5] * len(theta))
        after = model(x)
        es.restore(theta, saved)
        if factor == "A":
            assert torch.equal(after, before), "B = 0: (alpha/r) B (A + s eps) = 0, the output cannot move"
        else:
            assert (after - before).abs().max() > 1e-2
    # the schedule handles it: while some B is zero, every generation perturbs B
    assert [es.active_factor(g, adapters) for g in (1, 2, 3, 4)] == ["B"] * 4
    with torch.no_grad():
        for lora in adapters:
            lora.B.fill_(0.1)
    assert [es.active_factor(g, adapters) for g in (1, 2, 3, 4)] == ["B", "A", "B", "A"]


def test_an_A_generation_at_B_zero_gives_a_finite_zero_update():
    # If it happened anyway: the scale stays finite (norm floor) and equal fitness gives no step.
    _, model, adapters = tiny_lora(random_B=False)
    scales = es.perturbation_scales(adapters, "A", 0.1)
    assert all(np.isfinite(scales))
    x, y = es.make_rings(64, 0)
    fitness = []
    theta = es.lora_theta(adapters, "A")
    saved = [t.detach().clone() for t in theta]
    for s in es.member_seeds(0, 2, 4):
        for sign in (1.0, -1.0):
            es.perturb(theta, s, [sign * sk for sk in scales])
            fitness.append(es.fitness_of(model, x, y))
            es.restore(theta, saved)
    shaped = es.zscore(np.array(fitness))
    grad = es.es_gradient(theta, es.member_seeds(0, 2, 4), (shaped[0::2] - shaped[1::2]) / 2, scales)
    assert all(torch.count_nonzero(g) == 0 for g in grad)


@pytest.mark.parametrize("factor", ["A", "B", "AB"])
def test_perturb_then_restore_is_bit_exact_with_normalised_scales(factor):
    _, model, adapters = tiny_lora()
    all_before = [t.detach().clone() for t in es.lora_theta(adapters, "AB")]
    scales = es.perturbation_scales(adapters, factor, 0.37)
    if factor != "AB":  # s = sigma / ((alpha/r) ||other||_F), per layer
        other = "B" if factor == "A" else "A"
        expected = [0.37 / (lora.scale * getattr(lora, other).norm().item()) for lora in adapters]
        assert scales == expected and len(set(scales)) == len(adapters)
    theta = es.lora_theta(adapters, factor)
    saved = [t.detach().clone() for t in theta]
    for s in es.member_seeds(3, 7, 10):
        for sign in (1.0, -1.0):
            es.perturb(theta, s, [sign * sk for sk in scales])
            assert all(not torch.equal(t, b) for t, b in zip(theta, saved))
            if factor != "AB":  # the frozen factor is untouched, so its norm (and s) is the one we cached
                assert es.perturbation_scales(adapters, factor, 0.37) == scales
            es.restore(theta, saved)
    assert all(torch.equal(t, b) for t, b in zip(es.lora_theta(adapters, "AB"), all_before))


@pytest.mark.parametrize("factor", ["A", "B"])
def test_estimate_for_the_active_factor_points_along_the_true_gradient(factor):
    # A smooth problem: two adapted layers 6 -> 5 -> 4 (tanh between), fitness = -MSE to a fixed
    # target, in float64. Layer 2 holds its product as (3 B)(A / 3), so the layers' s_k differ ~3x.
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the Linear initialisation
    layers = [torch.nn.Linear(6, 5).double().requires_grad_(False), torch.nn.Linear(5, 4).double().requires_grad_(False)]
    adapters = [es.LoRALinear(layer, rank=2, alpha=3.0, generator=g) for layer in layers]
    with torch.no_grad():
        for lora, c in zip(adapters, (1.0, 3.0)):
            lora.B.copy_(c * torch.randn(lora.B.shape, generator=g, dtype=torch.float64))
            lora.A.div_(c)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    target = torch.randn(40, 4, generator=g, dtype=torch.float64)

    def loss():
        return ((adapters[1](torch.tanh(adapters[0](x))) - target) ** 2).mean()

    theta = es.lora_theta(adapters, factor)
    true_grad = [-t for t in torch.autograd.grad(loss(), theta)]  # d fitness / d factor, per layer
    scales = es.perturbation_scales(adapters, factor, 0.01)
    assert max(scales) / min(scales) > 2.5, scales

    seeds, saved, diffs = es.member_seeds(0, 1, 1000), [t.detach().clone() for t in theta], []
    for s in seeds:
        f = []
        for sign in (1.0, -1.0):
            es.perturb(theta, s, [sign * sk for sk in scales])
            with torch.no_grad():
                f.append(-loss().item())
            es.restore(theta, saved)
        diffs.append((f[0] - f[1]) / 2)
    est = es.es_gradient(theta, seeds, np.array(diffs), scales)  # raw fitness: an unbiased estimate
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    cosine = F.cosine_similarity(flat(est), flat(true_grad), dim=0).item()
    assert cosine > 0.9, cosine
    for e, t in zip(est, true_grad):  # each layer's 1/(P s_k) uses its own s_k (another layer's: gain ~3 or ~1/3)
        gain = (e * t).sum().item() / (t**2).sum().item()
        assert 0.6 < gain < 1.6, gain
    # shaped fitness only rescales it
    est_z = es.es_gradient(theta, seeds, es.zscore(np.array(diffs)), scales)
    assert F.cosine_similarity(flat(est_z), flat(true_grad), dim=0).item() > 0.9


def test_one_generation_of_the_loop_matches_the_formula_computed_by_hand():
    x, y = es.make_rings(64, 0)
    x = x.double()
    sigma, lr = 0.3, 0.2
    args = es.parse_args(["--population-size", "6", "--generations", "2", "--seed", "5", "--eval-every", "1"])
    _, model, adapters = tiny_lora(dtype=torch.float64)
    before = {f: [t.detach().clone() for t in es.lora_theta(adapters, f)] for f in "AB"}

    def choose(gen):
        factor = es.active_factor(gen, adapters)
        return factor, es.lora_theta(adapters, factor), es.perturbation_scales(adapters, factor, sigma)

    es.evolve("t", model, choose, args, sigma, lr, (x, y, x, y), lambda row: None)  # generation 1: B, 2: A

    _, ref_model, ref = tiny_lora(dtype=torch.float64)
    for gen, factor in ((1, "B"), (2, "A")):
        scales = [sigma / (lora.scale * getattr(lora, "A" if factor == "B" else "B").norm().item()) for lora in ref]
        seeds = es.member_seeds(5, gen, 3)
        fitness = []
        for s in seeds:
            for sign in (1.0, -1.0):
                noisy = copy.deepcopy(ref_model)
                noisy_adapters = [m for m in noisy if isinstance(m, es.LoRALinear)]
                for lora, eps, sk in zip(noisy_adapters, es.sample_eps(es.lora_theta(ref, factor), s), scales):
                    getattr(lora, factor).data += sign * sk * eps
                fitness.append(es.fitness_of(noisy, x, y))
        z = es.zscore(np.array(fitness))
        w = (z[0::2] - z[1::2]) / 2
        with torch.no_grad():
            for k, (lora, sk) in enumerate(zip(ref, scales)):
                g = sum(wj * es.sample_eps(es.lora_theta(ref, factor), s)[k] for wj, s in zip(w, seeds)) / (3 * sk)
                getattr(lora, factor).add_(lr * (sk / sigma) ** 2 * g)
    for f in "AB":
        for got, want, old in zip(es.lora_theta(adapters, f), es.lora_theta(ref, f), before[f]):
            torch.testing.assert_close(got, want)
            assert not torch.equal(got, old)


def one_generation_each(adapters_model, choose, sigma, lr):
    model, x, y = adapters_model
    args = es.parse_args(["--population-size", "20", "--generations", "2", "--seed", "4", "--eval-every", "1"])
    es.evolve("t", model, choose, args, sigma, lr, (x, y, x, y), lambda row: None)


def test_normalised_update_is_invariant_to_how_scale_is_split_between_A_and_B():
    x, y = es.make_rings(128, 0)
    products = {}
    for variant in ("alternating", "naive"):
        for c in (1.0, 8.0):
            _, model, adapters = tiny_lora(dtype=torch.float64)
            with torch.no_grad():
                for lora in adapters:  # B A is unchanged by B -> c B, A -> A / c
                    lora.B.mul_(c)
                    lora.A.div_(c)
            if variant == "alternating":
                def choose(gen, adapters=adapters):
                    factor = es.active_factor(gen, adapters)
                    return factor, es.lora_theta(adapters, factor), es.perturbation_scales(adapters, factor, 0.3)
            else:
                def choose(gen, adapters=adapters):
                    return "AB", es.lora_theta(adapters, "AB"), es.perturbation_scales(adapters, "AB", 0.3)
            one_generation_each((model, x.double(), y), choose, 0.3, 0.1)
            products[variant, c] = [lora.B @ lora.A for lora in adapters]
    for p1, p8 in zip(products["alternating", 1.0], products["alternating", 8.0]):
        torch.testing.assert_close(p1, p8, rtol=1e-6, atol=1e-9)
    # the naive variant is not invariant: the same seeds take it somewhere else
    assert any((p1 - p8).abs().max() > 1e-2 for p1, p8 in zip(products["naive", 1.0], products["naive", 8.0]))


@pytest.mark.parametrize("flags", [["--layers", "0,3"], ["--layers", "1,1"], ["--layers", "a"], ["--rank", "0"],
                                   ["--alpha", "0"], ["--target-center", "1"], ["--target-center", "nan,0"],
                                   ["--population-size", "7"], ["--sigma", "0"]])
def test_bad_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit):
        es.parse_args(flags)
    assert "must be" in capsys.readouterr().err


def test_end_to_end_run_beats_the_frozen_base_and_changes_only_adapters(tmp_path):
    r = es.main(["--generations", "40", "--population-size", "20", "--n-train", "256", "--n-test", "512",
                 "--no-full-es", "--naive", "--out-dir", str(tmp_path)])
    lora = r["LoRA-ES (alternating)"]
    assert lora["acc"] > r["base_acc"] + 0.1, (r["base_acc"], lora["acc"])
    assert "full ES" not in r and "LoRA-ES (naive)" in r
    # the base inside the adapted model is bit-identical to the pretrained one
    base_params = dict(r["base"].named_parameters())
    for name, t in lora["model"].state_dict().items():
        if name.endswith(".A") or name.endswith(".B"):
            continue
        assert torch.equal(t, base_params[name.replace(".base.", ".")]), name
    assert [row["factor"] for row in lora["rows"][:4]] == ["B", "A", "B", "A"]
    for name in ["args.json", "metrics.csv", "curve.png", "decision_boundary.png", "model.pt"]:
        assert os.path.getsize(os.path.join(r["run_dir"], name)) > 0
    with open(os.path.join(r["run_dir"], "metrics.csv")) as fh:
        assert len(fh.readlines()) == 1 + 2 * 40  # header + both methods


def test_all_equal_fitness_is_exactly_zero_for_values_that_are_not_binary_fractions():
    # mean([0.1] * 3) misses 0.1 in the last bit; (f - mean) / (std + 1e-8) alone gave 1.4e-9
    for values in ([0.1] * 3, [1.1] * 30, [-0.7] * 50, [1e6 / 3] * 7):
        for shape in (es.zscore, es.centered_ranks):
            assert np.all(shape(np.array(values)) == 0.0), (shape.__name__, values[0])


# ---------------------------------------------------------------------------------------------
# Oracle: whole generations of es_lora.main, for every method it runs, recomputed here from the
# docstring's formulas (alternation, s_k = sigma / ((alpha/r) ||other||_F), g_k = 1/(P s_k) sum_j
# w_j eps_jk, theta_k += lr (s_k/sigma)^2 g_k), with the initial adapters and the noise rebuilt by
# hand, compared elementwise with the tensors main() returns.
# ---------------------------------------------------------------------------------------------
def oracle_member_seeds(seed, generation, n):
    return np.random.default_rng([seed, generation]).integers(0, 2**31 - 1, size=n)


def oracle_eps(tensors, member_seed):
    """eps of tensor k of the evolved list: torch.randn from a generator seeded by SeedSequence([seed, k])."""
    out = []
    for k, t in enumerate(tensors):
        state = int(np.random.SeedSequence([int(member_seed), k]).generate_state(1)[0])
        out.append(torch.randn(t.shape, generator=torch.Generator().manual_seed(state)))
    return out


def oracle_shape(f, shaping):
    if shaping == "zscore":
        return (f - f.mean()) / (f.std() + 1e-8)
    return np.argsort(np.argsort(f)) / (len(f) - 1) - 0.5  # centered ranks (no ties here)


def oracle_fitness(linears, lora, x, y, scale):
    """-cross-entropy of the base with W x + b + scale * (x A^T) B^T on the layers in `lora` {k: (A, B)}."""
    h = x
    for k, lin in enumerate(linears):
        out = F.linear(h, lin.weight, lin.bias)
        if k in lora:
            A, B = lora[k]
            out = out + scale * (h @ A.T) @ B.T
        h = torch.tanh(out) if k < len(linears) - 1 else out
    return -F.cross_entropy(h, y).item()


def oracle_run(kind, base, x, y, seed, P, gens, sigma, lr, shaping, rank, alpha, layers):
    """kind: 'normalised', 'plain' (alternating, s = sigma), 'naive' (A and B together) or 'full'."""
    linears = [m for m in base if isinstance(m, torch.nn.Linear)]
    scale = alpha / rank
    if kind == "full":
        theta = [t.detach().clone() for lin in linears for t in (lin.weight, lin.bias)]
    else:
        g = torch.Generator().manual_seed(seed)
        lora = {}
        for k in layers:  # A random / sqrt(d_in), B zero, drawn in layer order from one generator
            d_out, d_in = linears[k].weight.shape
            lora[k] = [torch.randn(rank, d_in, generator=g) / d_in**0.5, torch.zeros(d_out, rank)]
    for gen in range(1, gens + 1):
        if kind == "full":
            idx, scales = None, [sigma] * len(theta)
        elif kind == "naive":
            idx = [(k, f) for k in layers for f in (0, 1)]  # [A0, B0, A1, B1, ...]
            scales = [sigma] * len(idx)
        else:
            f = 1 if gen % 2 == 1 or any(not torch.any(lora[k][1]) for k in layers) else 0  # 1 = B, 0 = A
            idx = [(k, f) for k in layers]
            scales = [sigma / (scale * lora[k][1 - f].norm().item()) if kind == "normalised" else sigma for k in layers]
        current = theta if kind == "full" else [lora[k][f] for k, f in idx]
        seeds = oracle_member_seeds(seed, gen, P)
        eps = [oracle_eps(current, s) for s in seeds]
        fit = []
        for j in range(P):
            for sign in (1.0, -1.0):
                moved = [t + sign * sk * e for t, sk, e in zip(current, scales, eps[j])]
                if kind == "full":
                    lin = [torch.nn.Linear(1, 1) for _ in linears]
                    for m, (W, b) in zip(lin, zip(moved[0::2], moved[1::2])):
                        m.weight, m.bias = torch.nn.Parameter(W), torch.nn.Parameter(b)
                    fit.append(oracle_fitness(lin, {}, x, y, scale))
                else:
                    trial = {k: list(v) for k, v in lora.items()}
                    for (k, f), t in zip(idx, moved):
                        trial[k][f] = t
                    fit.append(oracle_fitness(linears, trial, x, y, scale))
        s = oracle_shape(np.array(fit), shaping)
        w = [(s[2 * j] - s[2 * j + 1]) / 2 for j in range(P)]
        new = []
        for i, (t, sk) in enumerate(zip(current, scales)):
            g_i = sum(w[j] * eps[j][i].double() for j in range(P)) / (P * sk)  # 1/(P s_k)
            new.append((t.double() + lr * (sk / sigma) ** 2 * g_i).float())  # (s_k/sigma)^2
        if kind == "full":
            theta = new
        else:
            for (k, f), t in zip(idx, new):
                lora[k][f] = t
    return theta if kind == "full" else [t for k in layers for t in lora[k]]


@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
def test_oracle_generations_of_main_match_the_docstring_formula(tmp_path, shaping):
    seed, N, gens, sigma, lr, rank, alpha, full_sigma, full_lr = 2, 8, 3, 0.3, 0.25, 2, 3.0, 0.07, 0.15
    common = ["--seed", str(seed), "--population-size", str(N), "--generations", str(gens), "--sigma", str(sigma),
              "--lr", str(lr), "--rank", str(rank), "--alpha", str(alpha), "--layers", "0,2", "--hidden", "6",
              "--n-train", "96", "--n-test", "32", "--pretrain-steps", "20", "--shaping", shaping,
              "--full-sigma", str(full_sigma), "--full-lr", str(full_lr), "--eval-every", str(gens)]
    r1 = es.main(common + ["--naive", "--full-es", "--out-dir", str(tmp_path / "a")])
    r2 = es.main(common + ["--no-normalise", "--no-full-es", "--out-dir", str(tmp_path / "b")])
    x, y = es.make_rings(96, seed=seed + 1, center=(0.4, 0.0))  # the new task
    cases = [("normalised", r1, "LoRA-ES (alternating)", sigma, lr), ("naive", r1, "LoRA-ES (naive)", sigma, lr),
             ("full", r1, "full ES", full_sigma, full_lr), ("plain", r2, "LoRA-ES (alternating, s = sigma)", sigma, lr)]
    finals = {}
    for kind, r, method, sg, step in cases:
        model = r[method]["model"]
        if kind == "full":
            got = [t.detach() for t in model.parameters()]
        else:
            got = [t.detach() for m in model if isinstance(m, es.LoRALinear) for t in (m.A, m.B)]
        want = oracle_run(kind, r["base"], x, y, seed, N // 2, gens, sg, step, shaping, rank, alpha, [0, 2])
        start = oracle_run(kind, r["base"], x, y, seed, N // 2, 0, sg, step, shaping, rank, alpha, [0, 2])
        assert len(got) == len(want)
        for a, b, old in zip(got, want, start):
            moved = (b - old).abs().max().item()
            assert moved > 1e-2, (kind, moved)  # every tensor moved, far beyond the tolerance
            assert (a - b).abs().max().item() < 3e-5 * moved + 1e-7, (kind, (a - b).abs().max().item(), moved)
        finals[kind] = got
    # the four methods really differ (so an ignored --naive or --no-normalise cannot pass)
    for k1, k2 in (("normalised", "naive"), ("normalised", "plain"), ("naive", "plain")):
        assert any((a - b).abs().max() > 1e-3 for a, b in zip(finals[k1], finals[k2])), (k1, k2)
