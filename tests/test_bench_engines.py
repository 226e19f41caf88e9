"""bench/engines.py: its timed ES generation is es_llm_vllm.es_generation, and it counts what it times."""
import argparse
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import engines as bench  # noqa: E402
import es_llm_vllm as es  # noqa: E402
import llm_tasks  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_model(folder, layers=1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    problems = llm_tasks.countdown_task(argparse.Namespace(data_seed=0, num_train=4, num_test=1)).train
    ids = [llm_tasks.prompt_ids(tokenizer, p["messages"], p["prefix"]) for p in problems]
    return folder, tokenizer, problems, ids


def hf_engine(folder, tokenizer):
    args = es.parse_args(["--engine", "hf", "--model", str(folder), "--max-new-tokens", "6", "--dtype", "bfloat16"])
    return es.HFEngine(str(folder), args, tokenizer)


def test_timed_generate_counts_the_generated_tokens(tiny):
    folder, tokenizer, _, ids = tiny
    engine = hf_engine(folder, tokenizer)
    r = bench.timed_generate(engine, ids)
    assert r["prompts"] == 4
    assert r["tokens"] == sum(len(t) for t, _ in engine.generate(ids))  # greedy: same answers again
    assert r["tok_s"] == pytest.approx(r["tokens"] / r["seconds"])


def test_timed_es_generation_is_the_training_loops_generation(tiny):
    # The bench times es_llm_vllm.es_generation itself: the same seeds, fitness and update as
    # calling it directly on an identical engine, checked bit for bit.
    folder, tokenizer, problems, ids = tiny
    timed, direct = hf_engine(folder, tokenizer), hf_engine(folder, tokenizer)
    before = timed.checksum()
    args = bench.parse_args(["--population-size", "4", "--lr", "1e-3", "--sigma", "1e-2", "--seed", "3"])
    e = bench.timed_es_generation(es, timed, tokenizer, problems, args)
    assert timed.checksum() != before  # the update moved the weights

    task = llm_tasks.Task("countdown", problems, [], bench.tie_broken_reward)
    loop_args = es.parse_args(["--population-size", "4", "--lr", "1e-3", "--sigma", "1e-2", "--seed", "3"])
    fitness, tokens, _ = es.es_generation(direct, llm_tasks.make_chat(direct, tokenizer), task, problems, loop_args, 1,
                                       llm_tasks.Stopwatch())
    assert e["fitness"] == fitness and e["tokens"] == tokens
    assert timed.checksum() == direct.checksum()
    parts = sum(e[k + "_s"] for k in ("perturb", "generate", "score", "restore", "update"))
    assert parts <= e["total_s"] + 1e-6 and 0 < e["generate_share"] <= 1
    assert e["members"] == 4 and e["tokens"] > 0 and e["update_s"] > 0


@pytest.mark.parametrize("bad", [["--engines", "tpu"], ["--prompts", "0"], ["--prompts", "a,b"],
                                 ["--population-size", "3"], ["--sigma", "0"], ["--threads", "3"]])
def test_bad_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        bench.parse_args(bad)
