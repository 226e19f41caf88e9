"""Properties of rung 2 (es_mirrored.py): pairing, rank shaping, variance, a run."""
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


def test_mirrored_variance_is_lower_than_vanilla_at_equal_evaluations():
    vanilla, mirrored = es.gradient_variance(mirrored=False), es.gradient_variance(mirrored=True)
    assert mirrored < 0.1 * vanilla, (vanilla, mirrored)
    # the same holds away from the toy defaults
    assert es.gradient_variance(True, dim=20, evaluations=50, sigma=0.5) < es.gradient_variance(False, dim=20, evaluations=50, sigma=0.5)


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
    assert r["variance"]["mirrored"] < r["variance"]["vanilla"]
