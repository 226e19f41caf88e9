"""The conciseness experiment of Qiu et al. 2025 (arXiv 2509.24372), scaled to a CPU.

Setting (the paper's, from its conciseness script): two training prompts ("Solve: 3 + 5 =" -> "8";
"If all birds can fly and penguins are birds, can penguins fly?" -> "No"), reward
-|len(answer) - len(target)| in characters, greedy decoding of at most 100 new tokens,
population 30, sigma 1e-3, alpha 5e-4 (their update theta += alpha/N sum_i z_i eps_i, i.e. our
lr = alpha * sigma = 5e-7) for 1,000 iterations on a GPU. Held-out: the paper's 8 short
factual prompts. What the paper reports: ES reaches GRPO's reward with a much smaller KL
divergence from the base model and without reward hacking.

What this script does:
1. trains with es_llm_vllm.py (any engine; the offline SmolLM2-135M-Instruct by default) with
   the flags below, population 30 and sigma 1e-3 as in the paper; a CPU affords a few
   generations, not 1,000, so the default step is alpha = 4e-3 (8x the paper's, lr 4e-6; the
   step length per generation then matches es_llm_vllm.py's earlier default, lr 4e-6 with 8 members);
2. reads the held-out reward before and after from its metrics.csv, and the answers to the
   held-out prompts before and after from its samples.jsonl;
3. estimates KL(tuned || base) on the held-out prompts with Schulman's k3 estimator
   (http://joschu.net/blog/kl-approx.html), as the paper does: sample `--kl-samples` answers per
   prompt from the tuned model (temperature 1), score each answer token under both models
   (teacher forcing, float32), and with log r = log p_base(token) - log p_tuned(token)
       k3 = (r - 1) - log r  >= 0 per token,   KL per answer = sum over its tokens.
   Both models are loaded from float32 weights (the base conversion and the run's float32
   master), so the number measures how far ES moved the weights, not bf16 rounding.

Run:   python studies/conciseness_repro.py                        (train, then evaluate)
       python studies/conciseness_repro.py --run-dir runs/es_llm_vllm__0__<time>   (evaluate only)
See:   held-out reward before -> after, mean answer length, KL per answer and per token, wall time,
       and a before/after table of answers; also report.md and kl.json in the run folder.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="", help="evaluate this finished es_llm_vllm.py run instead of training")
    p.add_argument("--model", default="", help="as es_llm_vllm.py --model (empty: offline SmolLM2-135M-Instruct)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"], help="es_llm_vllm.py --engine")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="es_llm_vllm.py --dtype (auto: bf16 where it is fast, else float32)")
    p.add_argument("--population-size", type=int, default=30, help="members per generation (paper: 30)")
    p.add_argument("--mirrored", default=True, action=argparse.BooleanOptionalAction,
                   help="mirrored pairs (15 pairs = 30 members); the paper samples 30 independent members")
    p.add_argument("--sigma", type=float, default=1e-3, help="noise scale (paper: 1e-3)")
    p.add_argument("--lr", type=float, default=4e-6, help="our lr = Qiu's alpha * sigma (paper: 5e-7 for 1,000 iterations)")
    p.add_argument("--generations", type=int, default=8, help="ES generations (paper: 1,000)")
    p.add_argument("--eval-every", type=int, default=4, help="held-out evaluation every K generations")
    p.add_argument("--max-new-tokens", type=int, default=100, help="greedy generation limit (paper: 100)")
    p.add_argument("--seed", type=int, default=0, help="ES seed")
    p.add_argument("--kl-samples", type=int, default=8, help="sampled answers per held-out prompt for the KL estimate")
    p.add_argument("--kl-seed", type=int, default=0, help="seed of the sampling for the KL estimate")
    p.add_argument("--out-dir", default="runs", help="parent folder of the es_llm_vllm run folder")
    args = p.parse_args(argv)
    if not args.sigma > 0 or not math.isfinite(args.sigma) or not args.lr >= 0:
        p.error("--sigma must be > 0 and --lr >= 0")
    if args.population_size < 2 or (args.mirrored and args.population_size % 2):
        p.error("--population-size must be >= 2 (even with --mirrored)")
    if min(args.generations, args.eval_every, args.max_new_tokens, args.kl_samples) < 1:
        p.error("--generations, --eval-every, --max-new-tokens and --kl-samples must be >= 1")
    if args.run_dir and not (Path(args.run_dir) / "checkpoint" / "model.safetensors").is_file():
        p.error(f"--run-dir {args.run_dir}: no checkpoint/model.safetensors (not a finished es_llm_vllm.py run)")
    return args


def k3_per_token(logp_base, logp_tuned):
    """Schulman's k3 for KL(tuned || base) on tokens sampled from the tuned model: (r - 1) - log r."""
    log_r = np.asarray(logp_base, dtype=np.float64) - np.asarray(logp_tuned, dtype=np.float64)
    return np.expm1(log_r) - log_r


def answer_logprobs(model, prompt, answer):
    """log p(answer token t | prompt, answer[:t]) for every answer token, teacher-forced."""
    import torch
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(answer)[:, None])[:, 0].numpy()


def kl_estimate(base_dir, tuned_dir, tokenizer, test_ids, samples, max_new_tokens, seed):
    """Mean k3 KL(tuned || base) per sampled answer and per token over the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    eos = tuned.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    per_answer, per_token, lengths = [], [], []
    torch.manual_seed(seed)
    for prompt in test_ids:
        with torch.no_grad():
            ids = torch.tensor([prompt] * samples)
            out = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for row in out[:, len(prompt):].tolist():
            end = next((k for k, t in enumerate(row) if t in eos), None)
            answer = row[:end + 1] if end is not None else row  # the end-of-turn token is a choice too
            k3 = k3_per_token(answer_logprobs(base, prompt, answer), answer_logprobs(tuned, prompt, answer))
            per_answer.append(float(k3.sum()))
            per_token.extend(k3.tolist())
            lengths.append(len(answer))
    return {"kl_per_answer": float(np.mean(per_answer)), "kl_per_answer_std": float(np.std(per_answer)),
            "kl_per_token": float(np.mean(per_token)), "answers": len(per_answer),
            "mean_answer_tokens": float(np.mean(lengths))}


def main(argv=None):
    args = parse_args(argv)
    import es_llm_vllm as rung5
    import llm_engines
    import llm_tasks
    t0 = time.perf_counter()
    if args.run_dir:
        run_dir, train_seconds = Path(args.run_dir), None
    else:
        es_argv = ["--task", "conciseness", "--engine", args.engine, "--dtype", args.dtype,
                   "--population-size", str(args.population_size), "--sigma", str(args.sigma), "--lr", str(args.lr),
                   "--generations", str(args.generations), "--eval-every", str(args.eval_every),
                   "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
                   "--out-dir", args.out_dir, "--save-every", "0", "--show", "0",
                   "--mirrored" if args.mirrored else "--no-mirrored",
                   "--train-prompts", "2", "--no-layer-sigma",  # the paper's 2 prompts and one sigma
                   "--shaping", "zscore",  # the paper's (rung 5's bfloat16 default is centered ranks)
                   ] + (["--model", args.model] if args.model else [])
        print("python es_llm_vllm.py " + " ".join(es_argv))
        run_dir = Path(rung5.main(es_argv))
        train_seconds = time.perf_counter() - t0
    run_args = json.loads((run_dir / "args.json").read_text())
    rows = llm_tasks.read_metrics(run_dir / "metrics.csv")
    evals = [r for r in rows if r["eval_reward"] != ""]
    if len(evals) < 2:
        raise SystemExit(f"{run_dir}: needs held-out evaluations at the start and the end")
    first, last = evals[0], evals[-1]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    before = [s for s in samples if s["generation"] == first["generation"]]
    after = [s for s in samples if s["generation"] == last["generation"]]
    if train_seconds is None:
        train_seconds = sum(float(r["seconds_total"] or 0) + (float(r["seconds_eval"] or 0) if r["generation"] == 0
                                                               else 0) for r in rows)

    from transformers import AutoTokenizer
    base_dir = llm_engines.resolve_model(run_args.get("model", ""), run_args.get("cache_dir") or llm_engines.default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    test = llm_tasks.conciseness_task().test
    test_ids = [llm_tasks.prompt_ids(tokenizer, p["messages"]) for p in test]
    t_kl = time.perf_counter()
    kl = kl_estimate(base_dir, run_dir / "checkpoint", tokenizer, test_ids, args.kl_samples,
                     run_args.get("max_new_tokens", args.max_new_tokens), args.kl_seed)
    kl_seconds = time.perf_counter() - t_kl

    result = {"run_dir": str(run_dir), "generations": last["generation"], "population_size": run_args["population_size"],
              "sigma": run_args["sigma"], "lr": run_args["lr"], "alpha_qiu": run_args["lr"] / run_args["sigma"],
              "engine": run_args["engine"], "dtype": run_args["dtype"],
              "reward_before": first["eval_reward"], "reward_after": last["eval_reward"],
              "chars_before": first["eval_response_chars"], "chars_after": last["eval_response_chars"],
              "exact_before": first["eval_accuracy"], "exact_after": last["eval_accuracy"],
              "train_seconds": train_seconds, "kl_seconds": kl_seconds, **kl}
    (run_dir / "kl.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Conciseness, {result['generations']} generations, population {result['population_size']}, "
             f"sigma {result['sigma']:g}, lr {result['lr']:g} (alpha {result['alpha_qiu']:g})", "",
             "| | before | after |", "|---|---|---|",
             f"| held-out reward (mean of -abs(len - len(target))) | {first['eval_reward']:.1f} | {last['eval_reward']:.1f} |",
             f"| mean answer length (characters) | {first['eval_response_chars']:.0f} | {last['eval_response_chars']:.0f} |",
             f"| exact answers | {first['eval_accuracy']:.0%} | {last['eval_accuracy']:.0%} |",
             f"| KL(tuned \\|\\| base), k3, per sampled answer | 0 | {kl['kl_per_answer']:.3f} (std {kl['kl_per_answer_std']:.3f}, "
             f"{kl['answers']} answers) |",
             f"| KL per answer token | 0 | {kl['kl_per_token']:.4f} |", "",
             f"training wall time {train_seconds / 60:.1f} min, KL estimate {kl_seconds:.0f} s", "",
             "| prompt | before | after |", "|---|---|---|"]
    for b, a in zip(before, after):
        cell = lambda s: s["response"].replace("\n", " ").replace("|", "\\|")[:160]  # noqa: E731
        lines.append(f"| {b['prompt']} | {cell(b)} | {cell(a)} |")
    report = "\n".join(lines)
    (run_dir / "report.md").write_text(report + "\n")
    print(report)
    return result


if __name__ == "__main__":
    main()
