"""Several engines with Ray (llm_ray.py): wall time per ES generation with 1 vs N engines, and the
bytes that cross between the driver and the engines per generation.

One engine runs in this process with all `--cpus` threads (what es_llm_vllm.py does without
--engines); the pool runs `--engines` actors on a local Ray, each with cpus/engines threads. Both
call es_llm_vllm.es_generation itself for `--generations` generations from the same seed; the
first generation of each is reported apart (warm-up), the rest as the median. Bytes: the pickled
arguments and results of every call the pool makes (EnginePool.traffic); Ray adds a few hundred
bytes of its own per call. The weights never travel.

Run:   python bench/ray_engines.py                       (a tiny random model, built here, ~1 minute)
       python bench/ray_engines.py --model PATH --max-new-tokens 64    (a real model folder)
See:   seconds per generation for 1 and N engines, their ratio, bytes per generation (a few kB),
       and whether both reached the same final weights.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import es_llm_vllm as rung5  # noqa: E402
import llm_ray  # noqa: E402
import llm_support as support  # noqa: E402
from llm_tasks import make_task  # noqa: E402


def run(engine, tokenizer, args, generations):
    task = make_task(args)
    chat = support.make_chat(engine, tokenizer)
    seconds, traffic = [], []
    for g in range(1, generations + 1):
        before, t0 = getattr(engine, "traffic", 0), time.perf_counter()
        rung5.es_generation(engine, chat, task, task.train, args, g, support.Stopwatch())
        seconds.append(time.perf_counter() - t0)
        traffic.append(getattr(engine, "traffic", 0) - before)
    return seconds, traffic, engine.checksum()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="model folder (empty: a tiny random model from tests/llm_fixtures)")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="cores for the single engine and for the local Ray")
    p.add_argument("--population-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="bench/results/ray_engines.json")
    a = p.parse_args()
    model = a.model
    if not model:
        from llm_fixtures import build_tiny_model
        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0, counter=True))
    flags = ["--engine", "hf", "--model", model, "--dtype", a.dtype, "--max-new-tokens", str(a.max_new_tokens),
             "--population-size", str(a.population_size), "--sigma", "0.01", "--lr", "1e-3"]
    tokenizer = support.load_model_files(model)[0]
    torch.set_num_threads(a.cpus)
    support.NOISE_THREADS = a.cpus
    one_args = rung5.parse_args(flags)
    one = rung5.make_engine(one_args, model, tokenizer)
    s1, _, sum1 = run(one, tokenizer, one_args, a.generations)
    llm_ray.start_ray(num_cpus=a.cpus)
    pool_args = rung5.parse_args(flags + ["--engines", str(a.engines)])
    t0 = time.perf_counter()
    pool = support.engines(rung5.make_engine, rung5.evaluate_members, pool_args, model, tokenizer)
    start = time.perf_counter() - t0
    sN, bytes_per_gen, sumN = run(pool, tokenizer, pool_args, a.generations)
    pool.close()
    med1, medN = statistics.median(s1[1:] or s1), statistics.median(sN[1:] or sN)
    result = {"model": a.model or "tiny random Llama (tests/llm_fixtures.py, hidden 128)",
              "population_size": a.population_size, "max_new_tokens": a.max_new_tokens, "dtype": a.dtype,
              "cpus": a.cpus, "engines": a.engines, "seconds_per_generation_1": s1,
              f"seconds_per_generation_{a.engines}": sN,
              "median_1": round(med1, 3), f"median_{a.engines}": round(medN, 3),
              "ratio_time_N_over_1": round(medN / med1, 3), "pool_start_s": round(start, 1),
              "bytes_per_generation": bytes_per_gen, "same_final_weights": sum1 == sumN,
              "torch_threads": {"one engine": a.cpus, "each pool engine": max(1, a.cpus // a.engines)}}
    print(json.dumps(result, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
