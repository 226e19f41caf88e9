"""Properties of rung 2 (es_mirrored.py): pairing, rank shaping, variance, a run."""
import os

import numpy as np
import pytest
import torch

import es_mirrored as es


def test_odd_population_is_rejected(capsys):
    with pytest.raises(SystemExit):
        es.parse_args(["--population-size", "7"])
    assert "must be even" in capsys.readouterr().err


def test_unknown_shaping_is_rejected():
    with pytest.raises(SystemExit):
        es.parse_args(["--shaping", "softmax"])


def test_centered_ranks_exact_values():
    np.testing.assert_array_equal(es.centered_ranks(np.array([3.0, 1.0, 2.0])), [0.5, -0.5, 0.0])
    np.testing.assert_array_equal(es.centered_ranks(np.array([10.0, -4.0, 0.5, 7.0, 2.0])), [0.5, -0.5, -0.25, 0.25, 0.0])
    # ties share their mean rank: ranks 1 and 2 -> 1.5 each, over N-1 = 3
    np.testing.assert_allclose(es.centered_ranks(np.array([1.0, 1.0, 2.0, 0.0])), [0.0, 0.0, 0.5, -0.5])
    np.testing.assert_array_equal(es.centered_ranks(np.full(8, 0.3)), np.zeros(8))
    r = es.centered_ranks(np.random.default_rng(0).normal(size=101))
    assert r.min() == -0.5 and r.max() == 0.5 and abs(r.sum()) < 1e-12


def test_one_mirrored_pair_gives_the_exact_directional_derivative_on_a_quadratic():
    # f(x) = -0.5||x - c||^2: (f+ - f-)/2 = sigma * grad.eps exactly, so g = (grad.eps) eps.
    g = torch.Generator().manual_seed(0)
    params, centers = [torch.randn(6, 3, generator=g, dtype=torch.float64)], [torch.randn(6, 3, generator=g, dtype=torch.float64)]
    sigma, seed = 0.3, 12345
    saved = [p.clone() for p in params]
    f = []
    for sign in (1.0, -1.0):
        es.perturb(params, seed, sign * sigma)
        f.append(-0.5 * ((params[0] - centers[0]) ** 2).sum().item())
        es.restore(params, saved)
    est = es.es_gradient(params, [seed], np.array([(f[0] - f[1]) / 2]), sigma)[0]
    eps = es.sample_eps(params, seed)[0]
    grad = centers[0] - params[0]
    torch.testing.assert_close(est, (grad * eps).sum() * eps)


def test_mirrored_estimate_points_along_analytic_gradient():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 4, generator=g), torch.randn(7, generator=g)]
    centers = [torch.randn(5, 4, generator=g), torch.randn(7, generator=g)]
    true_grad = torch.cat([(c - p).flatten() for p, c in zip(params, centers)])
    seeds, sigma = es.member_seeds(0, 1, 1000), 0.05
    saved = [p.clone() for p in params]
    fitness = []
    for s in seeds:
        for sign in (1.0, -1.0):
            es.perturb(params, s, sign * sigma)
            fitness.append(-0.5 * sum(((p - c) ** 2).sum().item() for p, c in zip(params, centers)))
            es.restore(params, saved)
    for shape in (es.zscore, es.centered_ranks):
        shaped = shape(np.array(fitness))
        est = torch.cat([t.flatten() for t in es.es_gradient(params, seeds, (shaped[0::2] - shaped[1::2]) / 2, sigma)])
        assert torch.nn.functional.cosine_similarity(est, true_grad, dim=0).item() > 0.95


def test_all_equal_fitness_gives_zero_update_with_either_shaping():
    for shape in (es.zscore, es.centered_ranks):
        shaped = shape(np.full(10, 2.0))
        weights = (shaped[0::2] - shaped[1::2]) / 2
        grad = es.es_gradient([torch.randn(4, 4)], es.member_seeds(0, 1, 5), weights, 0.1)
        assert torch.count_nonzero(grad[0]) == 0


def test_end_to_end_run_learns_with_rank_shaping(tmp_path):
    r = es.main(["--generations", "80", "--population-size", "30", "--n-train", "512", "--n-test", "512",
                 "--adam-steps", "0", "--shaping", "centered_rank", "--out-dir", str(tmp_path)])
    assert r["final_acc"] > r["initial_acc"] + 0.25, (r["initial_acc"], r["final_acc"])


def test_all_equal_fitness_is_exactly_zero_for_values_that_are_not_binary_fractions():
    # mean([0.1] * 3) misses 0.1 in the last bit; (f - mean) / (std + 1e-8) alone gave 1.4e-9
    for values in ([0.1] * 3, [1.1] * 30, [-0.7] * 50, [1e6 / 3] * 7):
        for shape in (es.zscore, es.centered_ranks):
            assert np.all(shape(np.array(values)) == 0.0), (shape.__name__, values[0])


# ---------------------------------------------------------------------------------------------
# Oracle: whole generations of es_mirrored.main recomputed here from the docstring's formulas,
# with the noise rebuilt from the seeds by hand, compared elementwise with the weights main()
# saved. A wrong factor, a sign, a pair weight or an ignored --shaping makes them differ.
# ---------------------------------------------------------------------------------------------
def oracle_member_seeds(seed, generation, n):
    return np.random.default_rng([seed, generation]).integers(0, 2**31 - 1, size=n)


def oracle_eps(shapes, member_seed):
    """eps of tensor k of a member: torch.randn from a generator seeded by SeedSequence([seed, k])."""
    out = []
    for k, shape in enumerate(shapes):
        state = int(np.random.SeedSequence([int(member_seed), k]).generate_state(1)[0])
        out.append(torch.randn(shape, generator=torch.Generator().manual_seed(state)))
    return out


def oracle_fitness(theta, x, y):
    """-cross-entropy of the 2-h-h-3 tanh MLP with weights theta = [W1, b1, W2, b2, W3, b3]."""
    W1, b1, W2, b2, W3, b3 = theta
    h = torch.tanh(torch.nn.functional.linear(x, W1, b1))
    h = torch.tanh(torch.nn.functional.linear(h, W2, b2))
    return -torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, W3, b3), y).item()


def oracle_shape(f, shaping):
    if shaping == "zscore":
        return (f - f.mean()) / (f.std() + 1e-8)
    order = np.argsort(np.argsort(f))  # rank 0 = lowest fitness (no ties here)
    return order / (len(f) - 1) - 0.5


@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
def test_oracle_generations_of_main_match_the_docstring_formula(tmp_path, shaping):
    seed, N, sigma, lr, hidden, generations = 3, 8, 0.07, 0.15, 5, 2
    P = N // 2
    r = es.main(["--seed", str(seed), "--population-size", str(N), "--sigma", str(sigma), "--lr", str(lr),
                 "--hidden", str(hidden), "--generations", str(generations), "--n-train", "96", "--n-test", "32",
                 "--adam-steps", "0", "--shaping", shaping, "--out-dir", str(tmp_path)])
    x, y = es.make_rings(96, seed=seed)
    theta = [p.detach().clone() for p in es.make_model(hidden, seed, n_classes=3).parameters()]
    start = [t.clone() for t in theta]
    for gen in range(1, generations + 1):
        seeds = oracle_member_seeds(seed, gen, P)  # one seed per pair
        eps = [oracle_eps([t.shape for t in theta], s) for s in seeds]
        f = np.array([oracle_fitness([t + sign * sigma * e for t, e in zip(theta, eps_j)], x, y)
                      for eps_j in eps for sign in (1.0, -1.0)])  # [f_1+, f_1-, f_2+, f_2-, ...]
        s = oracle_shape(f, shaping)
        w = [(s[2 * j] - s[2 * j + 1]) / 2 for j in range(P)]
        g = [sum(w[j] * eps[j][k].double() for j in range(P)) / (P * sigma) for k in range(len(theta))]  # 1/(P sigma)
        theta = [(t.double() + lr * gk).float() for t, gk in zip(theta, g)]  # theta + lr * g
    saved = torch.load(os.path.join(r["run_dir"], "model.pt"))
    for got, want, old in zip(saved.values(), theta, start):
        step = (want - old).abs().max().item()
        assert step > 1e-2  # the update is large against the tolerance
        assert (got - want).abs().max().item() < 3e-5 * step + 1e-7, ((got - want).abs().max(), step)


# ---------------------------------------------------------------------------------------------
# --optimizer adam: two steps pinned against a hand computation (beta1 0.9, beta2 0.999, eps 1e-8),
# Adam run on the loss gradient -g, so the returned direction d goes up the fitness.
# ---------------------------------------------------------------------------------------------
def test_adam_first_two_steps_match_a_hand_computation():
    state = {}
    g1 = [torch.tensor([0.5, -2.0], dtype=torch.float64)]
    # step 1: m = 0.1 * -g1 = [-0.05, 0.2]; v = 0.001 * g1^2 = [0.00025, 0.004]
    #         bias correction: m_hat = m / (1 - 0.9) = -g1, v_hat = v / (1 - 0.999) = g1^2
    #         d = -m_hat / (sqrt(v_hat) + 1e-8) = g1 / |g1| = [1, -1] (up to the 1e-8)
    d1 = es.adam_direction(g1, state)[0]
    torch.testing.assert_close(d1, torch.tensor([0.5 / (0.5 + 1e-8), -2.0 / (2.0 + 1e-8)], dtype=torch.float64))
    torch.testing.assert_close(state[("m", 0)], torch.tensor([-0.05, 0.2], dtype=torch.float64))
    torch.testing.assert_close(state[("v", 0)], torch.tensor([0.00025, 0.004], dtype=torch.float64))
    g2 = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    # step 2: m = 0.9 * [-0.05, 0.2] + 0.1 * [-1, -1] = [-0.145, 0.08]
    #         v = 0.999 * [0.00025, 0.004] + 0.001 * [1, 1] = [0.00124975, 0.004996]
    #         m_hat = m / (1 - 0.9^2) = m / 0.19 = [-0.7631579, 0.4210526]
    #         v_hat = v / (1 - 0.999^2) = v / 0.001999 = [0.6251876, 2.4992496]
    #         d = -m_hat / (sqrt(v_hat) + 1e-8) = [0.9651820, -0.2663370]: the second weight still goes
    #         down although g2 says up: momentum from step 1 outweighs one step of opposite sign
    d2 = es.adam_direction(g2, state)[0]
    torch.testing.assert_close(d2, torch.tensor([0.9651820136, -0.2663370380], dtype=torch.float64), rtol=1e-8, atol=1e-9)
    assert state["t"] == 2


def test_adam_direction_is_invariant_to_the_scale_of_g():
    # Why Adam suits ES: the z-score, ranks and raw fitness give g very different scales; Adam's step does not care
    g = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0))]
    a, b = es.adam_direction(g, {}), es.adam_direction([1000.0 * g[0]], {})
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_main_with_adam_applies_lr_times_the_adam_direction(tmp_path):
    # One generation of main with --optimizer adam moves every weight by lr * sign(g) (Adam's first step).
    lr = 0.02
    r = es.main(["--generations", "1", "--population-size", "8", "--n-train", "64", "--n-test", "32", "--hidden", "4",
                 "--adam-steps", "0", "--optimizer", "adam", "--lr", str(lr), "--out-dir", str(tmp_path)])
    start = es.make_model(4, 0, n_classes=3).state_dict()
    saved = torch.load(os.path.join(r["run_dir"], "model.pt"))
    for k in start:
        torch.testing.assert_close((saved[k] - start[k]).abs(), torch.full_like(start[k], lr), rtol=1e-4, atol=1e-6)


def test_shaping_none_keeps_raw_fitness_and_unknown_optimizer_is_rejected(capsys):
    f = np.array([3.0, -1.0, 0.25])
    np.testing.assert_array_equal(es.SHAPINGS["none"](f), f)
    with pytest.raises(SystemExit):
        es.parse_args(["--optimizer", "rmsprop"])
    assert "invalid choice" in capsys.readouterr().err


def test_raw_fitness_with_too_large_an_lr_warns_that_the_run_diverges(tmp_path, capsys):
    # Measured: --shaping none diverges at lr >= 3 (training loss 5 to 10^5, fitness still finite); say so.
    r = es.main(["--shaping", "none", "--lr", "30", "--generations", "30", "--population-size", "20",
                 "--n-train", "256", "--n-test", "256", "--adam-steps", "0", "--out-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert r["diverged"] is not None and "WARNING" in captured.out + captured.err and "lower --lr" in captured.out
    ok = es.main(["--generations", "30", "--population-size", "20", "--n-train", "256", "--n-test", "256",
                  "--adam-steps", "0", "--out-dir", str(tmp_path)])
    assert ok["diverged"] is None
