"""studies/es_vs_grpo.py: ES rungs and TRL's GRPO with equal tuning trials and answer budgets; the
reward-blind answer checker (llm_tasks.answer_check) and the validation prompts.

End to end on a tiny random model (tests/llm_fixtures.py, nothing downloaded), CPU, transformers
engine, two trials per method and budgets of 8 and 16 answers. Skips without trl
(pip install -r requirements-bench.txt).
"""
import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies"))
import es_vs_grpo as bench  # noqa: E402
import llm_tasks  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402

TRAIN = {q for q, _ in llm_tasks.CONCISENESS_TRAIN}
TEST = {q for q, _ in llm_tasks.CONCISENESS_TEST}
VALID = {q for q, _ in llm_tasks.CONCISENESS_VALID}
MORE = {q for q, _ in llm_tasks.CONCISENESS_TRAIN_MORE}


def test_validation_prompts_are_new_and_every_prompt_has_a_check():
    assert len(VALID) == len(llm_tasks.CONCISENESS_VALID) >= 8
    assert not VALID & (TRAIN | TEST | MORE) and not MORE & (TRAIN | TEST)
    assert TRAIN | TEST | VALID | MORE == set(llm_tasks.CONCISENESS_CHECKS)
    for q, target in (llm_tasks.CONCISENESS_TRAIN + llm_tasks.CONCISENESS_TEST + llm_tasks.CONCISENESS_VALID
                      + llm_tasks.CONCISENESS_TRAIN_MORE):
        assert llm_tasks.answer_check(q, target)["correct"], q  # the target itself passes its check


@pytest.mark.parametrize("question, answer", [
    ("Calculate: 12 \u00d7 7 =", "84"), ("Calculate: 12 \u00d7 7 =", "12 \u00d7 7 = 84"),
    ("What is the capital of France?", "Paris"), ("What is the capital of France?", "The capital is Paris."),
    ("What is 15% of 200?", "30"), ("What is 15% of 200?", "15% of 200 is 30."),
    ("How many days are in a week?", "7"), ("How many days are in a week?", "There are seven days in a week."),
    ("What comes next in the sequence: 2, 4, 6, 8, ?", "10"), ("What comes next in the sequence: 2, 4, 6, 8, ?",
                                                               "The sequence is 2, 4, 6, 8, 10."),
    ('Is the statement "All cats are mammals" true or false?', "True"),
    ('Translate "Hello" to Spanish:', "\u00a1Hola!"), ("Name one primary color:", "Blue"),
    ("Name one primary color:", "The primary colors are: Red, Blue, and Yellow."),
])
def test_checker_accepts_correct_answers(question, answer):
    assert llm_tasks.answer_check(question, answer) == {"empty": False, "echo": False, "correct": True}


@pytest.mark.parametrize("question, answer, expected", [
    ("Calculate: 12 \u00d7 7 =", "", (True, False, False)),
    ("Calculate: 12 \u00d7 7 =", " ...\n", (True, False, False)),
    ("Calculate: 12 \u00d7 7 =", "12 \u00d7 7 =", (False, True, False)),  # the question again
    ("Calculate: 12 \u00d7 7 =", "842", (False, False, False)),  # 84 inside another number
    ("What is 15% of 200?", "15% of 200 is 200", (False, True, False)),
    ("How many days are in a week?", "How many days in a week", (False, True, False)),
    ("What is the capital of France?", "The capital of France", (False, True, False)),
    ("What is the capital of France?", "Lyon", (False, False, False)),
    ('Is the statement "All cats are mammals" true or false?', "False", (False, False, False)),
    ('Is the statement "All cats are mammals" true or false?', "True or false", (False, False, False)),
    ("Name one primary color:", "Purple", (False, False, False)),
    ("What comes next in the sequence: 2, 4, 6, 8, ?", "10.5", (False, False, False)),
])
def test_checker_rejects_empty_echoed_and_wrong_answers(question, answer, expected):
    c = llm_tasks.answer_check(question, answer)
    assert (c["empty"], c["echo"], c["correct"]) == expected


def test_checker_says_none_for_a_prompt_without_check():
    assert llm_tasks.answer_check("Write a poem:", "Roses")["correct"] is None


def test_both_methods_call_the_tasks_own_reward_function_through_one_counter():
    counters = []
    task = bench.counted_task(llm_tasks.make_task, counters)(llm_tasks.TaskArgs())
    assert counters[0].reward is llm_tasks.conciseness_reward  # the object itself, not a copy
    assert task.reward(task.train[0], " 8 ") == llm_tasks.conciseness_reward(task.train[0], " 8 ")
    task.reward(task.test[0], "Paris")
    s = counters[0].summary()
    assert (s["train_answers_scored"], s["eval_answers_scored"]) == (1, 1)
    assert s["reward_function"] == "llm_tasks.conciseness_reward" and s["train_prompts_seen"] == ["Solve: 3 + 5 ="]
    valid = bench.counted_task(llm_tasks.make_task, [], "valid")(llm_tasks.TaskArgs())
    assert {p["messages"][-1]["content"] for p in valid.test} == VALID and len(valid.train) == 2


@pytest.mark.parametrize("bad", [["--budgets", "128,100"], ["--budgets", "24"], ["--budgets", "x"],
                                 ["--trials", "0"], ["--trials", "10"], ["--tune-seeds", "1"],
                                 ["--tune-seeds", "100,100"], ["--population-size", "7"], ["--seeds", "0"],
                                 ["--grpo-completions", "3"], ["--grpo-completions", "1"], ["--task", "countdown"]])
def test_bad_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        bench.parse_args(bad)


def test_defaults_and_grids():
    a = bench.parse_args([])
    assert (a.budget_list, a.trials, a.tune_list, a.seeds, a.methods) == ([128, 512, 2048], 6, [100], 3,
                                                                          ["es", "es_lora", "grpo"])
    assert len(bench.ES_GRID) == len(bench.GRPO_GRID) == len(set(bench.ES_GRID)) == len(set(bench.GRPO_GRID))
    jobs = bench.trial_jobs(a, bench.rung_defaults(a.methods))
    assert [sum(j["method"] == m for j in jobs) for m in a.methods] == [6, 6, 6]
    assert {(j["budget"], j["eval_on"], j["seed"]) for j in jobs} == {(128, "valid", 100)}
    es = [j for j in jobs if j["method"] == "es"]
    assert (es[0]["lr"], es[0]["sigma"]) == (8e-6, 2e-3)  # trial 0: rung 5's own defaults
    assert bench.front([(1, 0), (2, -1), (3, 5), (0.5, -3), (4, 5)]) == [(0.5, -3), (1, 0), (3, 5)]


def test_old_records_are_refused(tmp_path):
    (tmp_path / "runs.jsonl").write_text(json.dumps({"method": "es", "seed": 0, "lr": 8e-6}) + "\n")
    with pytest.raises(SystemExit, match="earlier version"):
        bench.read_done(tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(SystemExit, match="earlier version"):
        bench.main(["--replot", str(tmp_path / "old.json"), "--results-dir", str(tmp_path / "r")])


def test_end_to_end_on_a_tiny_model(tmp_path):
    pytest.importorskip("trl", reason="studies/es_vs_grpo.py needs TRL: pip install -r requirements-bench.txt")
    model = build_tiny_model(tmp_path / "tiny", seed=0, counter=True)
    res = tmp_path / "results"
    flags = ["--model", str(model), "--population-size", "2", "--budgets", "8,16", "--trials", "2",
             "--tune-seeds", "100", "--seeds", "1", "--max-new-tokens", "8", "--kl-samples", "2", "--threads", "1"]
    results = bench.main(flags + ["--out-dir", str(tmp_path / "runs"), "--results-dir", str(res)])
    runs = results["runs"]
    methods = ["es", "es_lora", "grpo"]
    trials = {m: [r for r in runs if r["method"] == m and r["role"] == "trial"] for m in methods}
    finals = {m: [r for r in runs if r["method"] == m and r["role"] == "final"] for m in methods}
    # the same tuning effort: 2 trials per method, 2 distinct settings each, at the smallest budget
    assert [len(trials[m]) for m in methods] == [2, 2, 2]
    for m in methods:
        assert len({(r["lr"], r["sigma"], r["beta"]) for r in trials[m]}) == 2
        assert {(r["seed"], r["train_answers_scored"]) for r in trials[m]} == {(100, 8)}
    # no trial was scored on a test prompt: the counter saw training and validation prompts only
    for r in (r for rs in trials.values() for r in rs):
        assert set(r["eval_prompts_seen"]) == VALID and set(r["train_prompts_seen"]) == TRAIN
        assert {a["prompt"] for a in r["answers_after"]} == VALID
    # final runs: the chosen trial's setting, a fresh seed, the largest budget counted at the reward function
    for m in methods:
        assert len(finals[m]) == 1 and finals[m][0]["seed"] == 0
        c = results["chosen"][m]
        assert (finals[m][0]["lr"], finals[m][0]["sigma"], finals[m][0]["beta"]) == (c["lr"], c["sigma"], c["beta"])
        assert finals[m][0]["train_answers_scored"] == 16 and set(finals[m][0]["eval_prompts_seen"]) == TEST
        assert [p["answers"] for p in finals[m][0]["curve"]] == [0, 8, 16]  # evaluated at every budget
    assert {r["reward_function"] for r in runs} == {"llm_tasks.conciseness_reward"}
    for r in runs:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mib"] > 50 and r["kl_per_answer"] >= 0
        assert all(0 <= p["empty"] <= 1 and 0 <= p["echo"] <= 1 and 0 <= p["correct"] <= p["checkable"]
                   for p in r["curve"])
    assert set(results["summary"]) == set(methods)
    assert all(set(results["summary"][m]["budgets"]) == {"0", "8", "16"} for m in methods)
    # result files and plots
    names = ("es_vs_grpo.json", "es_vs_grpo_runs.csv", "es_vs_grpo_curves.png", "es_vs_grpo_kl.png",
             "es_vs_grpo_report.md")
    for name in names:
        assert (res / name).stat().st_size > 0, name
    with open(res / "es_vs_grpo_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(runs) == 9
    report = (res / "es_vs_grpo_report.md").read_text()
    assert "Equal compute, as defined here" in report and "What remains unfair" in report
    assert "15.5x" in report and "| 16 | GRPO (TRL)" in report and "| 16 | ES rung 6 (LoRA)" in report
    # --replot from the saved json, and --resume: every job is found in runs.jsonl, nothing is trained again
    again = bench.main(["--replot", str(res / "es_vs_grpo.json"), "--results-dir", str(tmp_path / "replot")])
    assert again["chosen"] == json.loads(json.dumps(results["chosen"]))
    for name in names[2:]:
        assert (tmp_path / "replot" / name).stat().st_size > 0, name
    bench_dir = next((tmp_path / "runs").glob("es_vs_grpo__*"))
    lines = (bench_dir / "runs.jsonl").read_text().count("\n")
    resumed = bench.main(flags + ["--resume", str(bench_dir), "--results-dir", str(tmp_path / "again")])
    assert (bench_dir / "runs.jsonl").read_text().count("\n") == lines
    assert [(r["method"], r["role"], r["seed"], r["reward_after"]) for r in resumed["runs"]] == \
        [(r["method"], r["role"], r["seed"], r["reward_after"]) for r in runs]
