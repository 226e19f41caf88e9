"""bench/engines.py: its timed ES generation is es_llm_vllm.py's generation, and it counts what it times."""
import argparse
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import engines as bench  # noqa: E402
import es_llm_vllm as es  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def hf_engine(tmp_path_factory):
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_model(folder, layers=1)
    args = es.parse_args(["--engine", "hf", "--model", str(folder), "--max-new-tokens", "6", "--dtype", "bfloat16"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    problems, _ = es.countdown_task(argparse.Namespace(data_seed=0, num_train=4, num_test=1))
    ids = [es.prompt_ids(tokenizer, p) for p in problems]
    return es.HFEngine(str(folder), args, tokenizer), tokenizer, problems, ids


def test_timed_generate_counts_the_generated_tokens(hf_engine):
    engine, _, _, ids = hf_engine
    r = bench.timed_generate(engine, ids)
    assert r["prompts"] == 4
    assert r["tokens"] == sum(len(t) for t, _ in engine.generate(ids))  # greedy: same answers again
    assert r["tok_s"] == pytest.approx(r["tokens"] / r["seconds"])


def test_timed_es_generation_applies_exactly_the_loops_update(hf_engine):
    engine, tokenizer, problems, ids = hf_engine
    before = engine.checksum()
    args = bench.parse_args(["--population-size", "4", "--lr", "0"])
    e = bench.timed_es_generation(es, engine, tokenizer, problems, ids, args)
    assert engine.checksum() == before  # perturb/restore exact, lr 0 moves nothing
    parts = sum(e[k + "_s"] for k in ("perturb", "generate", "score", "restore", "update"))
    assert parts <= e["total_s"] + 1e-6 and 0 < e["generate_share"] <= 1
    assert e["members"] == 4 and e["tokens"] > 0

    # with lr > 0 the update moves the weights (all-equal fitness is replaced by a ranking)
    args = bench.parse_args(["--population-size", "4", "--lr", "1e-3", "--sigma", "1e-2"])
    bench.timed_es_generation(es, engine, tokenizer, problems, ids, args)
    moved = engine.checksum()
    assert moved != before


@pytest.mark.parametrize("bad", [["--engines", "tpu"], ["--prompts", "0"], ["--prompts", "a,b"],
                                 ["--population-size", "3"], ["--sigma", "0"], ["--threads", "3"]])
def test_bad_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        bench.parse_args(bad)
