"""Population batching: one ES generation of rung 5 (members one after another) against rung 6
(the whole population in one call, as LoRA adapters), and the plain-inference ceiling.

Four ways to produce the same N members x P prompts greedy answers of <= --max-new-tokens
tokens, on the same model, dtype, engine kind and prompts (the conciseness task's training
prompts, as in the default runs), measured side by side in one process:

  rung5    es_llm_vllm.es_generation: per member perturb all weights, generate P prompts,
           restore; then the update (rung 5's default training step);
  adapter  es_llm_lora.es_generation: N adapters written and served together,
           N x P prompts in one generate call, the adapter update;
  eggroll  es_llm_eggroll.es_generation: N noise adapters in one call, the update of
           the full chosen matrices (inside vLLM's worker on --engine vllm);
  plain    the N x P prompts in one generate call of rung 5's engine, no perturbation, no LoRA:
           what batched inference alone costs, the ceiling for any ES generation of this size.

Each generation is a whole training step (rewards shaped, the update's arithmetic done), with
lr = 0 by default: the weights stay at the base, so every method keeps answering the same
model's neighbourhood (training shortens the answers, and the method that learns fastest would
then look fastest; --train uses the rungs' default lr instead). plain has its own engine that is
never perturbed. Generated tokens are counted and tok/s reported next to the seconds. Methods alternate within every round, so load from other jobs hits all alike;
the first round is a warm-up (first-call initialisation), then --rounds timed rounds, median
reported. Ratios: rung 5 seconds / method seconds (speed-up per generation) and plain seconds /
method seconds (share of the ceiling).

Run (2-core CPU):   python bench/population_batching.py                    (dtype auto)
                    python bench/population_batching.py --dtype bfloat16
GPU (one device):   python bench/population_batching.py --population-size 32 --max-new-tokens 256
See: a table of seconds per generation, tok/s, speed-up over rung 5 and share of the ceiling;
     results.json in the run folder. Goal on the 2-core CPU at N = 8: rung 6 >= 1.5x rung 5.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flags import parser_for  # bench/flags.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root

METHODS = ["rung5", "adapter", "eggroll", "plain"]


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "as es_llm_vllm.py --model (empty: offline SmolLM2-135M-Instruct)"})
    engine: str = field(default="auto", metadata={"help": "vllm, hf, or auto (vllm when installed) for every method"})
    dtype: str = field(default="auto", metadata={"help": "weights of every engine (auto: bf16 where it is fast)"})
    methods: str = field(default=",".join(METHODS), metadata={"help": "comma-separated subset of " + ",".join(METHODS)})
    population_size: int = field(default=8, metadata={"help": "members N (even: mirrored pairs, as the defaults)"})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy generation limit per answer (the rungs' default)"})
    train: bool = field(default=False, metadata={"help": "use the rungs' default lr (the answers shorten as they "
                                                         "learn); default: lr 0, the update computed but a no-op"})
    rounds: int = field(default=3, metadata={"help": "timed rounds after the warm-up round; the median is reported"})
    seed: int = field(default=0, metadata={"help": "seed of the member seeds and the adapter's initialisation"})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "vLLM on CPU: KV cache size in GiB per engine"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run folder (results.json)"})


def parse_args(argv=None) -> Args:
    parser = parser_for(Args, __doc__.split("\n")[0], {"engine": ["auto", "vllm", "hf"],
                                                        "dtype": ["auto", "bfloat16", "float16", "float32"]})
    args = Args(**vars(parser.parse_args(argv)))
    methods = args.methods.split(",")
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        parser.error(f"--methods must be distinct names from {','.join(METHODS)}, got {args.methods!r}")
    if args.population_size < 2 or args.population_size % 2:
        parser.error("--population-size must be an even number >= 2 (mirrored pairs)")
    if min(args.max_new_tokens, args.rounds) < 1 or not args.kv_cache_gb > 0:
        parser.error("--max-new-tokens and --rounds must be >= 1, --kv-cache-gb > 0")
    return args


class Method:
    """One way to run a generation: build(), then step(generation) -> (generated tokens, rows)."""

    def __init__(self, name, args, model_dir, tokenizer, task, max_model_len):
        import es_llm_eggroll
        import es_llm_lora
        import es_llm_vllm as rung5
        import llm_engines
        import llm_tasks
        self.name, self.task, self.problems, self.tokenizer = name, task, task.train, tokenizer
        common = ["--engine", args.engine, "--dtype", args.dtype, "--population-size", str(args.population_size),
                  "--max-new-tokens", str(args.max_new_tokens), "--kv-cache-gb", str(args.kv_cache_gb),
                  "--seed", str(args.seed), "--gen-batch-size", str(args.population_size * len(task.train))]
        self.rung = {"adapter": es_llm_lora, "eggroll": es_llm_eggroll}.get(name, rung5)
        self.args = self.rung.parse_args(common)
        if not args.train:
            self.args.lr = 0.0  # the update is computed in full and adds zero
        self.engine = self.rung.make_engine(self.args, model_dir, tokenizer, None, max_model_len)
        if self.rung is not rung5:  # the state the rung's main builds (global sigma)
            shapes = llm_engines.linear_shapes(model_dir, self.args.target_modules, self.args.layers)
            self.state = {"shapes": shapes, "sigmas": self.rung.layer_sigmas(dict.fromkeys(shapes, 1.0), self.args.sigma,
                                                                            False)}
            if name == "adapter":
                self.state["adapter"] = self.rung.init_adapter(shapes, self.args.rank, self.args.init_b, self.args.seed)
        self.ids = [llm_tasks.prompt_ids(tokenizer, p["messages"], p["prefix"]) for p in self.problems]

    def step(self, generation):
        import llm_tasks
        n = self.args.population_size
        clock = llm_tasks.Stopwatch()
        if self.name == "plain":
            out = self.engine.generate(self.ids * n)
            return sum(len(t) for t, _ in out), len(out)
        chat = llm_tasks.make_chat(self.engine, self.tokenizer, clock)
        if self.rung.SCRIPT == "es_llm_vllm":
            _, tokens, _ = self.rung.es_generation(self.engine, chat, self.task, self.problems, self.args, generation, clock)
        else:
            _, tokens, _ = self.rung.es_generation(self.engine, chat, self.task, self.problems, self.state, self.args,
                                                generation, clock)
        return tokens, n * len(self.problems)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import llm_engines
    import llm_tasks
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if args.engine == "auto":
        args.engine = llm_engines.pick_engine("auto")
    if args.dtype == "auto":
        args.dtype = llm_engines.auto_dtype("cpu" if not torch.cuda.is_available() else "cuda")
    try:
        model_dir = llm_engines.resolve_model(args.model, llm_engines.default_cache_dir(), args.dtype)
    except llm_engines.ModelNotFound as err:
        raise SystemExit(str(err))
    tokenizer = llm_engines.load_model_files(model_dir)[0]
    task = llm_tasks.conciseness_task()
    max_model_len = task.max_context(lambda conv: len(llm_tasks.prompt_ids(tokenizer, *conv)), args.max_new_tokens)
    methods = args.methods.split(",")
    run_dir = Path(args.out_dir) / f"bench_population_batching__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    machine = (f"{torch.cuda.get_device_name() if torch.cuda.is_available() else torch.backends.cpu.get_cpu_capability()}"
               f", {os.cpu_count()} cores, torch {torch.__version__}")
    rows = args.population_size * len(task.train)
    print(f"model {model_dir} | engine {args.engine} | {args.dtype} | N = {args.population_size} members x "
          f"{len(task.train)} prompts = {rows} answers per generation, <= {args.max_new_tokens} tokens | {machine}")
    t_all = time.perf_counter()
    built, start_s = {}, {}
    for name in methods:
        t0 = time.perf_counter()
        built[name] = Method(name, args, model_dir, tokenizer, task, max_model_len)
        start_s[name] = time.perf_counter() - t0
        print(f"{name}: engine ready in {start_s[name]:.0f} s", flush=True)
    timings = {name: [] for name in methods}
    for round_ in range(args.rounds + 1):  # round 0: warm-up, not reported
        for name in methods:
            t0 = time.perf_counter()
            tokens, answered = built[name].step(round_ + 1)
            seconds = time.perf_counter() - t0
            print(f"  round {round_}{' (warm-up)' if round_ == 0 else ''} {name:8s} {answered} answers, "
                  f"{tokens:5d} tokens in {seconds:6.1f} s = {tokens / seconds:6.1f} tok/s", flush=True)
            if answered != rows:
                raise RuntimeError(f"{name} answered {answered} prompts, expected {rows}")
            if round_ > 0:
                timings[name].append({"seconds": seconds, "tokens": tokens})
    for method in built.values():
        method.engine.close()
    result = {"machine": machine, "model": str(model_dir), "engine": args.engine, "dtype": args.dtype,
              "population_size": args.population_size, "prompts": len(task.train), "answers": rows,
              "max_new_tokens": args.max_new_tokens, "engine_start_s": start_s, "rounds": timings, "methods": {}}
    for name in methods:
        seconds = statistics.median(t["seconds"] for t in timings[name])
        tokens = statistics.median(t["tokens"] for t in timings[name])
        result["methods"][name] = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}
    for name, r in result["methods"].items():
        if "rung5" in result["methods"]:
            r["speedup_over_rung5"] = result["methods"]["rung5"]["seconds"] / r["seconds"]
        if "plain" in result["methods"]:
            r["share_of_plain"] = result["methods"]["plain"]["seconds"] / r["seconds"]
    result["wall_s"] = time.perf_counter() - t_all
    print(f"\n| method | s per generation (median of {args.rounds}) | generated tokens | tok/s | "
          "speed-up over rung 5 | share of plain inference |")
    print("|---|---|---|---|---|---|")
    for name, r in result["methods"].items():
        print(f"| {name} | {r['seconds']:.1f} | {r['tokens']:.0f} | {r['tok_s']:.1f} | "
              f"{r.get('speedup_over_rung5', float('nan')):.2f}x | {r.get('share_of_plain', float('nan')):.0%} |")
    for name in ("adapter", "eggroll"):
        if name in result["methods"] and "rung5" in result["methods"]:
            speedup = result["methods"][name]["speedup_over_rung5"]
            print(f"goal rung 6 {name} >= 1.5x rung 5 per generation: {'met' if speedup >= 1.5 else 'MISSED'} "
                  f"({speedup:.2f}x)")
    print(f"total wall time {result['wall_s']:.0f} s; results in {run_dir / 'results.json'}")
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
