"""--train-prompts of the conciseness task: the paper's 2 training prompts first, then ours, the
held-out prompts and the reward untouched, and the flag's bounds enforced by every LLM rung."""

import json
from types import SimpleNamespace

import pytest

import es_llm_eggroll
import es_llm_lora
import es_llm_ray
import es_llm_vllm
import llm_tasks


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_train_prompts_takes_the_papers_two_then_ours_in_order(k):
    task = llm_tasks.conciseness_task(SimpleNamespace(train_prompts=k))
    expected = (llm_tasks.CONCISENESS_TRAIN + llm_tasks.CONCISENESS_TRAIN_MORE)[:k]
    assert [(p["messages"][-1]["content"], p["target"]) for p in task.train] == expected
    assert [(p["messages"][-1]["content"], p["target"]) for p in task.test] == llm_tasks.CONCISENESS_TEST
    assert task.reward is llm_tasks.conciseness_reward


def test_without_args_the_task_is_the_papers():
    assert len(llm_tasks.conciseness_task().train) == 2 == len(llm_tasks.CONCISENESS_TRAIN)


@pytest.mark.parametrize("rung", [es_llm_vllm, es_llm_ray, es_llm_lora, es_llm_eggroll])
@pytest.mark.parametrize("value", ["0", "9"])
def test_every_rung_refuses_train_prompts_out_of_range(rung, value, capsys):
    with pytest.raises(SystemExit):
        rung.parse_args(["--train-prompts", value])
    assert "--train-prompts must be" in capsys.readouterr().err


@pytest.mark.parametrize("rung", [es_llm_vllm, es_llm_ray, es_llm_lora, es_llm_eggroll])
def test_llm_rungs_train_on_eight_prompts_and_an_older_run_resumes_on_the_papers_two(rung, tmp_path):
    assert rung.parse_args([]).train_prompts == 8
    saved = vars(rung.parse_args([]))
    del saved["train_prompts"]  # a run folder written before --train-prompts existed
    (tmp_path / "args.json").write_text(json.dumps(saved))
    assert rung.parse_args(["--resume", str(tmp_path)]).train_prompts == 2
    assert rung.parse_args(["--resume", str(tmp_path), "--train-prompts", "8"]).train_prompts == 8


@pytest.mark.parametrize("rung", [es_llm_vllm, es_llm_ray])
def test_rung5_defaults_to_per_tensor_sigma_and_an_older_run_keeps_one_sigma(rung, tmp_path):
    assert rung.parse_args([]).layer_sigma and not rung.parse_args(["--no-layer-sigma"]).layer_sigma
    saved = vars(rung.parse_args(["--no-layer-sigma"]))  # a run folder written when one sigma was the default
    (tmp_path / "args.json").write_text(json.dumps(saved))
    assert not rung.parse_args(["--resume", str(tmp_path)]).layer_sigma