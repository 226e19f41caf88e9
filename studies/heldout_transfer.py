"""Does rung 5's training signal carry over to the held-out prompts? Measured on mirrored pairs.

es_llm_vllm.py's default conciseness run raises the training reward in every run, but the
held-out reward (the paper's 8 test prompts) rises in some runs and falls in others. This script
measures where the gain is lost, on the engine and model the rung trains with:

1. the base model's answers: length, truncation (answers that hit --max-new-tokens), reward, for
   the 2 training and the 8 held-out prompts;
2. for `--pairs` random directions eps_k (the rung's own noise, from the rung's member seeds),
   both members theta +- sigma*eps_k answer all 10 prompts in one call. Per pair:
       d_train = f_train(+) - f_train(-)      (what the ES estimate is built from)
       d_test  = f_test(+)  - f_test(-)
   If the training signal carried over, d_test would follow d_train: we report their correlation
   (Pearson and Spearman) over the pairs, the share of pairs where the signs agree, and the
   spread of the held-out reward over all members (how much a change of weights of size sigma
   moves the held-out metric when nothing is learned: the metric's noise floor).

Run:   python studies/heldout_transfer.py                 (dtype auto, 16 pairs, ~5 minutes)
       python studies/heldout_transfer.py --dtype bfloat16 --max-new-tokens 128
See:   the base answers' truncation and lengths, the per-pair table, the correlations; results.json
       in runs/bench_heldout_transfer__<seed>__<time>/.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the rung scripts live at the repository root


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="", help="as es_llm_vllm.py --model (empty: offline SmolLM2-135M-Instruct)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"], help="as es_llm_vllm.py --engine")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="as es_llm_vllm.py --dtype")
    p.add_argument("--pairs", type=int, default=16, help="mirrored pairs (random directions) to measure")
    p.add_argument("--sigma", type=float, default=2e-3, help="noise scale (es_llm_vllm.py's default)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy generation limit (es_llm_vllm.py's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs' noise seeds")
    p.add_argument("--out-dir", default="runs", help="parent folder of the results folder")
    args = p.parse_args(argv)
    if args.pairs < 3:
        p.error("--pairs must be >= 3 (a correlation needs a few points)")
    if not args.sigma > 0 or args.max_new_tokens < 1:
        p.error("--sigma must be > 0 and --max-new-tokens >= 1")
    return args


def spearman(a, b):
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def split(results, n_train):
    train, test = results[:n_train], results[n_train:]
    return float(np.mean([r["reward"] for r in train])), float(np.mean([r["reward"] for r in test])), train, test


def main(argv=None):
    args = parse_args(argv)
    import es_llm_vllm as rung5
    import llm_engines
    import llm_tasks
    rung_args = rung5.parse_args(["--engine", args.engine, "--dtype", args.dtype, "--model", args.model,
                                  "--max-new-tokens", str(args.max_new_tokens), "--sigma", str(args.sigma)])
    task = llm_tasks.conciseness_task()
    problems, n_train = task.train + task.test, len(task.train)
    try:
        model_dir = llm_engines.resolve_model(args.model, llm_engines.default_cache_dir(), rung_args.dtype)
    except llm_engines.ModelNotFound as err:
        raise SystemExit(str(err))
    tokenizer = llm_engines.load_model_files(model_dir)[0]
    max_len = task.max_context(lambda conv: len(llm_tasks.prompt_ids(tokenizer, *conv)), args.max_new_tokens)
    engine = rung5.make_engine(rung_args, model_dir, tokenizer, None, max_len)
    chat = llm_tasks.make_chat(engine, tokenizer)
    run_dir = Path(args.out_dir) / f"bench_heldout_transfer__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    base_train, base_test, train_r, test_r = split(task.rollout(chat, problems), n_train)
    print(f"{engine.name} | {rung_args.dtype} | <= {args.max_new_tokens} new tokens | sigma {args.sigma}")
    for name, rs, f in (("train", train_r, base_train), ("held-out", test_r, base_test)):
        print(f"base {name}: reward {f:.1f}, {np.mean([len(r['response']) for r in rs]):.0f} chars, "
              f"truncated {np.mean([r['truncated'] for r in rs]):.0%}, "
              f"{np.mean([r['tokens'] for r in rs]):.1f} tokens per answer")

    members = rung5.member_seeds(args.seed, 1, 2 * args.pairs, mirrored=True)
    rows = []
    for k in range(args.pairs):
        pair = {}
        for member_seed, sign in members[2 * k:2 * k + 2]:
            engine.perturb(member_seed, sign * args.sigma)
            f_train, f_test, tr, te = split(task.rollout(chat, problems), n_train)
            engine.restore()
            pair[sign] = (f_train, f_test, float(np.mean([r["truncated"] for r in tr])))
        row = {"seed": members[2 * k][0], "train_plus": pair[1][0], "train_minus": pair[-1][0],
               "test_plus": pair[1][1], "test_minus": pair[-1][1],
               "d_train": pair[1][0] - pair[-1][0], "d_test": pair[1][1] - pair[-1][1],
               "train_truncated": (pair[1][2] + pair[-1][2]) / 2}
        rows.append(row)
        print(f"pair {k:2d}: train {row['train_plus']:7.1f} / {row['train_minus']:7.1f} (d {row['d_train']:+6.1f}) | "
              f"held-out {row['test_plus']:7.1f} / {row['test_minus']:7.1f} (d {row['d_test']:+6.1f})", flush=True)

    d_train = np.array([r["d_train"] for r in rows])
    d_test = np.array([r["d_test"] for r in rows])
    tests = np.array([[r["test_plus"], r["test_minus"]] for r in rows]).ravel()
    trains = np.array([[r["train_plus"], r["train_minus"]] for r in rows]).ravel()
    informative = d_train != 0
    summary = {
        "engine": engine.name, "dtype": rung_args.dtype, "max_new_tokens": args.max_new_tokens, "sigma": args.sigma,
        "pairs": args.pairs, "base_train": base_train, "base_test": base_test,
        "base_train_truncated": float(np.mean([r["truncated"] for r in train_r])),
        "base_test_truncated": float(np.mean([r["truncated"] for r in test_r])),
        "pearson_d_train_d_test": float(np.corrcoef(d_train, d_test)[0, 1]),
        "spearman_d_train_d_test": spearman(d_train, d_test),
        "sign_agreement": float(np.mean(np.sign(d_train[informative]) == np.sign(d_test[informative])))
        if informative.any() else None,
        "pairs_with_train_difference": int(informative.sum()),
        "member_test_mean": float(tests.mean()), "member_test_std": float(tests.std()),
        "member_test_min": float(tests.min()), "member_test_max": float(tests.max()),
        "member_train_std": float(trains.std()), "mean_abs_d_train": float(np.abs(d_train).mean()),
        "mean_abs_d_test": float(np.abs(d_test).mean()),
        "seconds": time.perf_counter() - t0}
    engine.close()
    print(f"\nheld-out reward over the {2 * args.pairs} perturbed members: mean {summary['member_test_mean']:.1f}, "
          f"std {summary['member_test_std']:.1f}, range {summary['member_test_min']:.1f} .. "
          f"{summary['member_test_max']:.1f} (base {base_test:.1f})")
    print(f"d_train vs d_test over {args.pairs} pairs: Pearson {summary['pearson_d_train_d_test']:+.2f}, Spearman "
          f"{summary['spearman_d_train_d_test']:+.2f}; signs agree in {summary['sign_agreement']} of the "
          f"{summary['pairs_with_train_difference']} pairs whose training rewards differ")
    print(f"mean |d_train| {summary['mean_abs_d_train']:.1f}, mean |d_test| {summary['mean_abs_d_test']:.1f}; "
          f"{summary['seconds']:.0f} s; results in {run_dir}")
    (run_dir / "results.json").write_text(json.dumps({"summary": summary, "pairs": rows}, indent=2))
    return summary


if __name__ == "__main__":
    main()
