"""bench/population_batching.py: every method answers N x P prompts, its ES steps are the rungs'
own training steps, and the reported ratios are the ratios of the medians it measured."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import es_llm_lora as rung6  # noqa: E402
import llm_engines  # noqa: E402
import llm_tasks  # noqa: E402
import population_batching as bench  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), layers=1)


def test_bad_flags_get_one_message(capsys):
    for flags in (["--methods", "rung5,nope"], ["--population-size", "3"], ["--rounds", "0"], ["--methods", "plain,plain"]):
        with pytest.raises(SystemExit):
            bench.parse_args(flags)
        assert "error:" in capsys.readouterr().err


def test_the_benchmarked_adapter_step_is_rung_6s_training_step(tmp_path):
    tiny = build_tiny_model(tmp_path / "counter", counter=True)  # answer lengths differ between members
    args = bench.parse_args(["--engine", "hf", "--dtype", "float32", "--max-new-tokens", "24", "--population-size", "4",
                              "--train"])
    tokenizer = llm_engines.load_model_files(str(tiny))[0]
    task = llm_tasks.conciseness_task()
    method = bench.Method("adapter", args, str(tiny), tokenizer, task, 256)
    tokens, answered = method.step(1)
    assert answered == 4 * len(task.train) and tokens > 0
    # the same generation by hand, from the same start
    shapes = llm_engines.linear_shapes(str(tiny), rung6.PROJECTIONS, "")
    state = {"shapes": shapes, "sigmas": rung6.layer_sigmas({k: 1.0 for k in shapes}, method.args.sigma, False),
             "adapter": rung6.init_adapter(shapes, 1, method.args.init_b, 0)}
    engine = rung6.make_engine(method.args, str(tiny), tokenizer)
    _, expected_tokens, _ = rung6.es_generation(engine, llm_tasks.make_chat(engine, tokenizer), task, task.train, state,
                                             method.args, 1, llm_tasks.Stopwatch())
    assert tokens == expected_tokens
    for name, ab in state["adapter"].items():
        assert torch.equal(method.state["adapter"][name]["B"], ab["B"]), name  # generation 1 moves B
        assert torch.equal(method.state["adapter"][name]["A"], ab["A"]), name
    assert any(not torch.equal(ab["B"], b["B"]) for ab, b in
               zip(state["adapter"].values(), rung6.init_adapter(shapes, 1, method.args.init_b, 0).values()))


def test_a_whole_run_reports_the_ratios_of_its_medians(tiny, tmp_path):
    torch.set_num_threads(1)
    result = bench.main(["--model", str(tiny), "--engine", "hf", "--dtype", "float32", "--max-new-tokens", "6",
                         "--population-size", "4", "--rounds", "2", "--out-dir", str(tmp_path)])
    assert set(result["methods"]) == set(bench.METHODS) and result["answers"] == 4 * 2
    for name, r in result["methods"].items():
        rounds = result["rounds"][name]
        assert len(rounds) == 2
        assert r["seconds"] == pytest.approx(sorted(t["seconds"] for t in rounds)[0] / 2 +
                                             sorted(t["seconds"] for t in rounds)[1] / 2)
        assert r["speedup_over_rung5"] == pytest.approx(result["methods"]["rung5"]["seconds"] / r["seconds"])
        assert r["share_of_plain"] == pytest.approx(result["methods"]["plain"]["seconds"] / r["seconds"])
    saved = json.loads(next(Path(tmp_path).glob("bench_population_batching__*/results.json")).read_text())
    assert saved["methods"] == result["methods"]


def test_without_train_the_update_runs_but_leaves_the_weights_at_the_base(tiny):
    args = bench.parse_args(["--engine", "hf", "--dtype", "float32", "--max-new-tokens", "6", "--population-size", "4"])
    tokenizer = llm_engines.load_model_files(str(tiny))[0]
    method = bench.Method("eggroll", args, str(tiny), tokenizer, llm_tasks.conciseness_task(), 256)
    before = [m.clone() for m in method.engine.weights.master]
    method.step(1)
    assert method.args.lr == 0.0 and all(torch.equal(a, b) for a, b in zip(before, method.engine.weights.master))
