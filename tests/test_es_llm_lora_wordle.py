"""Wordle through rung 6 (es_llm_lora.py): the multi-turn task of llm_tasks.py runs unchanged, the
whole population's games in one engine call per turn, each row answered by its own member."""
import pytest
import torch

import es_llm_lora as es
import llm_tasks
from test_es_llm_vllm_wordle import PENALTY, TINY, read_rows, read_samples, tiny_dir, tokenizer  # noqa: F401


class ScriptedPopulation:
    """No model. serve() gets the population (2 members: +eps, -eps) or the centre (1 member).
    At turn k (1 + 2k user-role markers in the prompt) the centre and the +eps member guess
    ORDER[k]; the -eps member writes no tag at turn 0, then guesses MISSES[k]. Records every
    generate call as the list of members of its rows."""

    name = "scripted"

    def __init__(self, tokenizer, order, misses):
        self.tokenizer, self.order, self.misses = tokenizer, order, misses
        self.user = tokenizer.convert_tokens_to_ids("<|user|>")
        self.size, self.calls = 0, []

    def serve(self, population):
        self.size = len(next(iter(population.values()))[0]) if population else 0

    def answer(self, member, k):
        if self.size < 2 or member == 0:
            return self.order[k].upper() + "</guess> because"
        return "hello" if k == 0 else self.misses[k] + "</guess>"

    def generate(self, prompts, members=None):
        self.calls.append((self.size, list(members)))
        texts = [self.answer(m, (p.count(self.user) - 1) // 2) for p, m in zip(prompts, members)]
        return [(self.tokenizer(t, add_special_tokens=False)["input_ids"], False) for t in texts]

    def nonfinite(self):
        return 0  # scripted answers: no logits

    def close(self):
        pass


def test_scripted_games_of_the_whole_population_in_one_call_per_turn(tiny_dir, tokenizer, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    task = llm_tasks.make_task(es.parse_args(TINY))
    (train0, train1), (test0, test1) = [p["secret"] for p in task.train], [p["secret"] for p in task.test]
    order = [train0, train1, test0, test1, "about", "house"]
    misses = [None] + [w for w in sorted(task.words) if w not in order][:5]
    engine = ScriptedPopulation(tokenizer, order, misses)
    monkeypatch.setattr(es, "make_engine", lambda *a, **k: engine)
    run_dir = es.main([*TINY, "--engine", "hf", "--model", str(tiny_dir), "--out-dir", str(tmp_path),
                       "--generations", "2", "--eval-every", "1", "--checkpoint", "final", "--seed", "5",
                       "--target-modules", "q_proj", "--rank", "2", "--no-layer-sigma"])  # the scripted engine has no weights
    fb, letters = llm_tasks.wordle_feedback, llm_tasks.wordle_letters
    # +eps solves its two games on turns 1 and 2; -eps: one invalid turn, then five valid misses
    plus = ((1 + 5 / 6) + (1 + 4 / 6)) / 2
    minus = sum(0.5 * sum(letters(fb(w, s)) for w in misses[1:]) / 30 - PENALTY for s in (train0, train1)) / 2
    rows = read_rows(run_dir)
    assert [r["generation"] for r in rows] == ["0", "1", "2"]
    for r in rows[1:]:
        assert (float(r["train_reward_max"]), float(r["train_reward_min"])) == pytest.approx((plus, minus))
    for r in rows:  # the centre solves the held-out games on turns 3 and 4
        assert float(r["eval_reward"]) == pytest.approx(((1 + 3 / 6) + (1 + 2 / 6)) / 2)
        assert float(r["eval_solved"]) == 1.0
    # one call per turn for the whole population, only unfinished games: rows are (member, game)
    # in member-major order; member 0 finishes game 0 after turn 1 and game 1 after turn 2
    evaluation = [(1, [0, 0])] * 3 + [(1, [0])]
    training = [(2, [0, 0, 1, 1]), (2, [0, 1, 1])] + [(2, [1, 1])] * 4
    assert engine.calls == evaluation + (training + evaluation) * 2
    samples = read_samples(run_dir)
    assert samples[0]["response"] == f"{train0} {fb(train0, test0)} | {train1} {fb(train1, test0)} | {test0} GGGGG"
    # the pair's rewards differ, so the update moved B (generation 1) and A (generation 2)
    import llm_engines
    saved, _ = llm_engines.read_peft_adapter(run_dir / "checkpoint")
    start = es.init_adapter(llm_engines.linear_shapes(str(tiny_dir), "q_proj"), 2, es.Args.init_b, 5)
    for name, (A, B) in saved.items():
        assert not torch.equal(A, start[name]["A"]) and not torch.equal(B, start[name]["B"]), name
