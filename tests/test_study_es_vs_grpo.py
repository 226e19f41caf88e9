"""studies/es_vs_grpo.py: ES and TRL's GRPO on the same prompts, reward function and answer budget.

End to end on a tiny random model (tests/llm_fixtures.py, nothing downloaded), CPU, transformers
engine, a couple of generations/steps. Skips without trl (pip install -r requirements-bench.txt).
"""
import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies"))
import es_vs_grpo as bench  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402


def test_both_methods_call_the_tasks_own_reward_function_through_one_counter():
    import llm_tasks
    counters = []
    task = bench.counted_task(llm_tasks.make_task, counters)(llm_tasks.TaskArgs())
    assert counters[0].reward is llm_tasks.conciseness_reward  # the object itself, not a copy
    assert task.reward(task.train[0], " 8 ") == llm_tasks.conciseness_reward(task.train[0], " 8 ")
    task.reward(task.test[0], "Paris")
    s = counters[0].summary()
    assert (s["train_answers_scored"], s["eval_answers_scored"]) == (1, 1)
    assert s["reward_function"] == "llm_tasks.conciseness_reward" and s["train_prompts_seen"] == ["Solve: 3 + 5 ="]


@pytest.mark.parametrize("bad", [["--grpo-lrs", "1e-5,-1"], ["--grpo-lrs", "x"], ["--sweep-seeds", "1,1"],
                                 ["--population-size", "7"], ["--sigma", "0"], ["--seeds", "0"],
                                 ["--grpo-completions", "3"], ["--grpo-completions", "1"], ["--task", "wordle"]])
def test_bad_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        bench.parse_args(bad)


def test_equal_budget_is_derived_from_the_es_settings():
    args = bench.parse_args(["--grpo-completions", "4"])  # 8 members x 8 generations = 4 completions x 16 steps
    assert (args.steps, args.grpo_eval_every) == (16, 8)
    assert bench.parse_args([]).steps == 8


def test_es_flags_default_to_rung_5s_defaults():
    import es_llm_vllm as rung5
    a, d = bench.parse_args([]), rung5.Args()
    keys = ("population_size", "sigma", "lr", "generations", "eval_every", "max_new_tokens", "batch_size", "eval_size")
    assert [getattr(a, k) for k in keys] == [getattr(d, k) for k in keys] and d.mirrored


def test_end_to_end_on_a_tiny_model(tmp_path):
    pytest.importorskip("trl", reason="studies/es_vs_grpo.py needs TRL: pip install -r requirements-bench.txt")
    model = build_tiny_model(tmp_path / "tiny", seed=0, counter=True)
    res = tmp_path / "results"
    results = bench.main(["--model", str(model), "--population-size", "2", "--generations", "2", "--eval-every", "1",
                          "--max-new-tokens", "8", "--lr", "1e-3", "--sigma", "0.05", "--grpo-lrs", "1e-3,1e-2",
                          "--sweep-seeds", "0", "--seeds", "1", "--kl-samples", "2",
                          "--out-dir", str(tmp_path / "runs"), "--results-dir", str(res)])
    runs = results["runs"]
    es = [r for r in runs if r["method"] == "es"]
    grpo = [r for r in runs if r["method"] == "grpo"]
    lora = [r for r in runs if r["method"] == "es_lora"]
    assert len(es) == 1 and len(grpo) == 3  # ES seed 0; GRPO sweep at 2 lrs, the best one reused as seed 0
    assert len(lora) == 1 and (lora[0]["lr"], lora[0]["sigma"]) == (3e-3, 0.05)  # rung 6 with its own defaults
    assert set(results["summary"]) == {"es", "es_lora", "grpo"}
    assert results["grpo_lr"] in (1e-3, 1e-2) and set(results["sweep"]) == {"0.001", "0.01"}
    # the same reward function, the same training and held-out prompts, the same measured budget
    assert {r["reward_function"] for r in runs} == {"llm_tasks.conciseness_reward"}
    assert {tuple(r["train_prompts_seen"]) for r in runs} == {tuple(sorted(
        ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]))}
    assert {r["train_answers_scored"] for r in runs} == {2 * 2 * 2}  # generations x members x prompts
    held_out = {tuple(a["prompt"] for a in r[k]) for r in runs for k in ("answers_before", "answers_after")}
    assert len(held_out) == 1 and len(next(iter(held_out))) == 8
    assert {tuple(c["answers"] for c in r["curve"]) for r in runs} == {(0, 4, 8)}
    assert {r["reward_before"] for r in runs} == {es[0]["reward_before"]}  # one base model, one greedy evaluation
    for r in runs:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mib"] > 50 and r["kl_per_answer"] >= 0
    # result files and plots
    for name in ("es_vs_grpo.json", "es_vs_grpo_runs.csv", "es_vs_grpo_curves.png", "es_vs_grpo_kl.png",
                 "es_vs_grpo_report.md"):
        assert (res / name).stat().st_size > 0, name
    with open(res / "es_vs_grpo_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(runs)
    assert json.loads((res / "es_vs_grpo.json").read_text())["grpo_lr"] == results["grpo_lr"]
    report = (res / "es_vs_grpo_report.md").read_text()
    assert "| ES rung 5" in report and "| ES rung 6" in report and "| GRPO" in report
    # --resume: every run is found in the folder's runs.jsonl, nothing is trained again
    bench_dir = next((tmp_path / "runs").glob("es_vs_grpo__*"))
    lines = (bench_dir / "runs.jsonl").read_text().count("\n")
    again = bench.main(["--model", str(model), "--population-size", "2", "--generations", "2", "--eval-every", "1",
                        "--max-new-tokens", "8", "--lr", "1e-3", "--sigma", "0.05", "--grpo-lrs", "1e-3,1e-2",
                        "--sweep-seeds", "0", "--seeds", "1", "--kl-samples", "2", "--resume", str(bench_dir),
                        "--results-dir", str(tmp_path / "again")])
    assert (bench_dir / "runs.jsonl").read_text().count("\n") == lines
    assert [(r["method"], r["seed"], r["reward_after"], r["kl_per_answer"]) for r in again["runs"]] == \
        [(r["method"], r["seed"], r["reward_after"], r["kl_per_answer"]) for r in runs]
