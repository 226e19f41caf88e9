"""bench/estimator_quality.py: its vanilla and mirrored estimators match their formulas (quadratic error, the
linear cosine formula, an oracle), and a tiny run writes its report."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import estimator_quality as eq  # noqa: E402
import es_mirrored  # noqa: E402


@pytest.mark.parametrize("mirrored,directions", [(False, 199), (True, 100)])
def test_cosine_formula_matches_the_quadratic_estimates_at_small_sigma(mirrored, directions):
    # the chunked cell must give the same mean cosine as sqrt(P / (P + d + 1)) for P Gaussian directions
    _, cos = eq.quadratic_cell(mirrored, dim=400, evaluations=200, sigma=0.1, trials=60, seed=0)
    assert abs(cos / eq.formula_cosine(directions, 400) - 1) < 0.05, cos


def test_tiny_run_writes_three_tables(tmp_path):
    out = tmp_path / "report.md"
    r = eq.main(["--seeds", "1", "--quad-sigmas", "0.1,3", "--quad-trials", "20", "--toy-sigmas", "0.1",
                 "--toy-generations", "0,2", "--toy-trials", "2", "--dims", "10,1000", "--populations", "20",
                 "--dim-trials", "4", "--out", str(out)])
    text = out.read_text()
    assert text.count("### ") == 3 and "vanilla / mirrored" in text and "formula (P = N / 2)" in text
    assert len(r["toy"]) == 2 and all(-1 <= row[m] <= 1 for row in r["toy"] for m in ("vanilla", "mirrored"))


@pytest.mark.parametrize("flags", [["--populations", "7"], ["--quad-sigmas", "0"], ["--dims", "a"], ["--seeds", "0"]])
def test_bad_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit):
        eq.parse_args(flags)
    assert "must" in capsys.readouterr().err


def quadratic_mse(mirrored, sigma, trials=4000):
    est, c = eq.quadratic_estimates(mirrored, dim=100, evaluations=20, sigma=sigma, trials=trials)
    return ((est - c) ** 2).mean().item(), (c**2).sum().item()


@pytest.mark.parametrize("sigma", [0.1, 3.0])
def test_like_for_like_quadratic_errors_match_their_formulas(sigma):
    # f(x) = -0.5||x - c||^2 at 0, d = 100, N = 20. Mirrored: each pair gives (eps.c) eps exactly, so
    # MSE = ||c||^2 (1 + 1/d) / P whatever sigma. Vanilla with its mean baseline (rung 1's z-score up
    # to scale): f_i - mean f keeps sigma eps_i.c and the centred even term -(sigma^2/2)(||eps_i||^2 - d),
    # MSE ~ (1 - 1/N) (||c||^2 (1 + 1/d) + sigma^2 (d + 4) / 2) / N.
    d, N, P = 100, 20, 10
    mirrored, c2 = quadratic_mse(True, sigma)
    vanilla, _ = quadratic_mse(False, sigma)
    assert abs(mirrored / (c2 * (1 + 1 / d) / P) - 1) < 0.08, mirrored
    assert abs(vanilla / ((1 - 1 / N) * (c2 * (1 + 1 / d) + sigma**2 * (d + 4) / 2) / N) - 1) < 0.08, vanilla


def test_like_for_like_mirrored_loses_at_small_sigma_and_wins_at_large_sigma():
    # half as many directions for the same evaluations: about 2x worse where the even-order term is small
    assert quadratic_mse(False, 0.1)[0] < 0.55 * quadratic_mse(True, 0.1)[0]
    # the centred even term sigma^2 (||eps||^2 - d) / 2 dominates vanilla at sigma 3; the pairs cancel it
    assert quadratic_mse(True, 3.0)[0] < 0.5 * quadratic_mse(False, 3.0)[0]


def test_toy_estimates_at_small_sigma_follow_the_linear_formula():
    # At sigma 0.01 the fitness is nearly linear at the scale of the noise: cos^2 ~ P / (P + d + 1) with
    # P = N - 1 directions for vanilla (after its baseline) and N / 2 for mirrored; d = 1,251.
    torch.set_num_threads(1)
    x, y = es_mirrored.make_rings(512, seed=0)
    model = es_mirrored.make_model(32, 0, n_classes=3)
    before = [p.detach().clone() for p in model.parameters()]
    cos = {m: eq.cosines(*eq.toy_estimates(model, x, y, m, 0.01, 50, 6, seed=0)).mean().item() for m in (False, True)}
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    d = sum(p.numel() for p in before)
    assert abs(cos[False] / (49 / (49 + d + 1)) ** 0.5 - 1) < 0.25, cos
    assert abs(cos[True] / (25 / (25 + d + 1)) ** 0.5 - 1) < 0.25, cos
    assert cos[False] > cos[True], cos  # here mirroring costs: half as many directions, nothing to cancel



# Oracle helpers (the same as tests/test_es_mirrored.py's): noise, seeds and fitness rebuilt by hand.
def oracle_member_seeds(seed, generation, n):
    return np.random.default_rng([seed, generation]).integers(0, 2**31 - 1, size=n)


def oracle_eps(shapes, member_seed):
    out = []
    for k, shape in enumerate(shapes):
        state = int(np.random.SeedSequence([int(member_seed), k]).generate_state(1)[0])
        out.append(torch.randn(shape, generator=torch.Generator().manual_seed(state)))
    return out


def oracle_fitness(theta, x, y):
    return oracle_fitness_tensor(theta, x, y).item()


@pytest.mark.parametrize("mirrored", [False, True])
def test_oracle_toy_estimate_matches_the_formula(mirrored):
    # One estimate of table 2, recomputed here from the formulas: vanilla is es_basic's
    # 1/(N sigma) sum_i z_i eps_i over N seeds, mirrored this rung's 1/(P sigma) sum_j (z_j+ - z_j-)/2 eps_j.
    seed, N, sigma, hidden = 2, 8, 0.2, 5
    x, y = es_mirrored.make_rings(96, seed=seed)
    model = es_mirrored.make_model(hidden, seed, n_classes=3)
    est, true = eq.toy_estimates(model, x, y, mirrored, sigma, N, trials=2, seed=seed)
    theta = [p.detach().clone() for p in model.parameters()]
    theta_g = [t.clone().requires_grad_() for t in theta]
    loss = -oracle_fitness_tensor(theta_g, x, y)
    want_true = -torch.cat([g.flatten() for g in torch.autograd.grad(loss, theta_g)])
    assert torch.allclose(true, want_true, rtol=1e-5, atol=1e-7)
    for t in range(2):
        n_dirs = N // 2 if mirrored else N
        seeds = oracle_member_seeds(seed + 7919, t, n_dirs)  # the comparison's seeds, apart from training's
        eps = [oracle_eps([p.shape for p in theta], s) for s in seeds]
        signs = (1.0, -1.0) if mirrored else (1.0,)
        f = np.array([oracle_fitness([p + sign * sigma * e for p, e in zip(theta, eps_j)], x, y)
                      for eps_j in eps for sign in signs])
        z = (f - f.mean()) / (f.std() + 1e-8)
        w = (z[0::2] - z[1::2]) / 2 if mirrored else z
        g = torch.cat([(sum(w[j] * eps[j][k].double() for j in range(n_dirs)) / (n_dirs * sigma)).flatten()
                       for k in range(len(theta))])
        assert torch.allclose(est[t].double(), g, rtol=0, atol=1e-5 * g.abs().max().item()), (est[t] - g).abs().max()


def oracle_fitness_tensor(theta, x, y):
    W1, b1, W2, b2, W3, b3 = theta
    h = torch.tanh(torch.nn.functional.linear(x, W1, b1))
    h = torch.tanh(torch.nn.functional.linear(h, W2, b2))
    return -torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, W3, b3), y)
