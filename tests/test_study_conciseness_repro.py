"""studies/conciseness_repro.py: the k3 KL estimator is exact in expectation; a model has zero KL to itself."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies"))
import conciseness_repro as repro  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402


def test_k3_is_nonnegative_zero_at_equality_and_unbiased():
    q = np.array([0.5, 0.2, 0.15, 0.1, 0.05])  # "tuned", the sampling distribution
    p = np.array([0.3, 0.3, 0.2, 0.1, 0.1])  # "base"
    exact = float(np.sum(q * np.log(q / p)))  # KL(q || p)
    x = np.random.default_rng(0).choice(5, size=200_000, p=q)
    k3 = repro.k3_per_token(np.log(p[x]), np.log(q[x]))
    assert np.all(k3 >= 0)
    assert abs(k3.mean() - exact) < 0.02 * exact
    assert np.all(repro.k3_per_token(np.log(q[x]), np.log(q[x])) == 0)


def test_model_has_zero_kl_to_itself_and_positive_kl_to_a_changed_copy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    build_tiny_model(base_dir, layers=1)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = [tokenizer("Solve: 3 + 5 =")["input_ids"], tokenizer("Is the sun a star?")["input_ids"]]
    same = repro.kl_estimate(base_dir, base_dir, tokenizer, prompts, samples=3, max_new_tokens=8, seed=0)
    assert same["kl_per_answer"] == 0.0 and same["answers"] == 6
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tuned_dir)
    changed = repro.kl_estimate(base_dir, tuned_dir, tokenizer, prompts, samples=3, max_new_tokens=8, seed=0)
    assert changed["kl_per_answer"] > 1e-3


@pytest.mark.parametrize("bad", [["--sigma", "0"], ["--population-size", "3"], ["--kl-samples", "0"],
                                 ["--run-dir", "/nonexistent"]])
def test_bad_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        repro.parse_args(bad)
