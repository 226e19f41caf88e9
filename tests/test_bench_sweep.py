"""bench/sweep.py: its batched ES generation is es_basic.py's generation; the sweep writes its outputs."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import es_basic  # noqa: E402
import sweep  # noqa: E402


def es_basic_noise(params, seeds):
    """es_basic's per-(member, tensor) noise, flattened into sweep's (N, P) layout."""
    return torch.stack([torch.cat([e.flatten() for e in es_basic.sample_eps(params, s)]) for s in seeds])


def test_batched_fitness_equals_es_basic_member_by_member():
    x, y = es_basic.make_rings(300, seed=3)
    model = es_basic.make_model(32, seed=3, n_classes=3)
    params = list(model.parameters())
    seeds = es_basic.member_seeds(3, 1, 12)
    eps = es_basic_noise(params, seeds)
    saved = [p.detach().clone() for p in params]
    reference = []
    for s in seeds:
        es_basic.perturb(params, s, 0.3)
        reference.append(es_basic.fitness_of(model, x, y))
        es_basic.restore(params, saved)
    theta, shapes = sweep.flat_params(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved))  # views hold the same values
    batched = sweep.population_fitness(theta, shapes, eps, 0.3, x, y)
    assert np.ptp(reference) > 1e-3  # the members really differ
    np.testing.assert_allclose(batched, reference, rtol=0, atol=2e-6)


def test_generation_update_equals_es_basic():
    x, y = es_basic.make_rings(256, seed=1)
    fast_model, slow_model = es_basic.make_model(32, seed=1, n_classes=3), es_basic.make_model(32, seed=1, n_classes=3)
    slow = list(slow_model.parameters())
    theta, shapes = sweep.flat_params(fast_model)
    sigma, lr = 0.1, 0.05
    for gen in range(1, 4):
        seeds = es_basic.member_seeds(1, gen, 20)
        sweep.es_generation(theta, shapes, es_basic_noise(slow, seeds), sigma, lr, x, y)
        # es_basic.main's loop body
        saved = [p.detach().clone() for p in slow]
        fitness = np.empty(len(seeds))
        for i, s in enumerate(seeds):
            es_basic.perturb(slow, s, sigma)
            fitness[i] = es_basic.fitness_of(slow_model, x, y)
            es_basic.restore(slow, saved)
        grad = es_basic.es_gradient(slow, seeds, es_basic.zscore(fitness), sigma)
        with torch.no_grad():
            for p, g in zip(slow, grad):
                p.add_(lr * g)
    moved = sum((p - q).abs().sum().item() for p, q in zip(slow, es_basic.make_model(32, seed=1, n_classes=3).parameters()))
    assert moved > 1.0
    for p, q in zip(fast_model.parameters(), slow):  # the model's parameters are views into theta
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_fixed_budget_grid_and_the_shared_cell():
    args = sweep.parse_args([])
    tasks = sweep.make_tasks(args)
    grid2 = [t for t in tasks if t["grid"] == "pop_batch"]
    for t in grid2:
        used = t["generations"] * t["population_size"] * t["batch"]
        assert args.budget - t["population_size"] * t["batch"] < used <= args.budget
    # the default budget makes grid 2's (N=50, B=256) cell the very runs of grid 1's (0.1, 0.03) cell
    shared = [{k: v for k, v in t.items() if k != "grid"} for t in grid2
              if (t["population_size"], t["batch"]) == (50, 256)]
    grid1 = [{k: v for k, v in t.items() if k != "grid"} for t in tasks
             if t["grid"] == "sigma_lr" and (t["sigma"], t["lr"]) == (0.1, 0.03)]
    assert shared and shared == grid1


@pytest.mark.parametrize("bad", [["--sigmas", "0.1,-1"], ["--batches", "2000"], ["--populations", "1"],
                                 ["--grids", "nope"], ["--lrs", "a,b"], ["--budget", "10"]])
def test_bad_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        sweep.parse_args(bad)


def test_small_sweep_end_to_end(tmp_path):
    out = sweep.main(["--sigmas", "0.1", "--lrs", "0.03,30", "--generations", "60", "--batch", "128",
                      "--populations", "4,16", "--batches", "32,128", "--budget", "61440", "--seeds", "2",
                      "--workers", "1", "--out-dir", str(tmp_path)])
    run_dir = out["run_dir"]
    for name in ("sweep_sigma_lr.png", "sweep_pop_batch.png", "runs.csv", "summary.json", "args.json"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    with open(os.path.join(run_dir, "runs.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 + 4 * 2
    good = [r for r in rows if r["grid"] == "sigma_lr" and float(r["lr"]) == 0.03]
    wild = [r for r in rows if r["grid"] == "sigma_lr" and float(r["lr"]) == 30]
    assert all(float(r["final_loss"]) < float(r["initial_loss"]) - 0.1 for r in good)  # ES learns
    assert all(r["diverged"] == "True" for r in wild)  # a step 1000x too large makes the loss worse
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert [0.1, 30.0] in summary["sigma_lr"]["diverged"]
    assert summary["sigma_lr"]["best"] == [0.1, 0.03]
    os.remove(os.path.join(run_dir, "sweep_pop_batch.png"))
    again = sweep.main(["--replot", run_dir])  # redraws from runs.csv alone
    assert again["summary"] == summary and os.path.getsize(os.path.join(run_dir, "sweep_pop_batch.png")) > 0
