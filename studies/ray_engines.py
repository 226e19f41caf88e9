"""Several engines with Ray (llm_ray.py): wall time per ES generation with 1 vs N engines, and the
bytes that cross between the driver and the engines per generation, for rung 5.

One engine runs in this process with all `--cpus` threads (what the rung does without
--engines); the pool runs `--engines` actors on a local Ray, each with cpus/engines threads. Both
call rung 5's own es_generation (es_llm_vllm) for `--generations` generations from the same seed;
the first generation of each is reported apart (warm-up), the rest as the median.
Bytes: the pickled arguments and results of every call the pool makes (EnginePool.traffic); Ray
adds a few hundred bytes of its own per call. The weights never travel.

Run:   python studies/ray_engines.py                       (a tiny random model, built here, ~2 minutes)
       python studies/ray_engines.py --model PATH --max-new-tokens 64    (a real model folder)
See:   seconds per generation for 1 and N engines, their ratio, bytes per generation (a few kB),
       and whether both reached the same final weights.
Measured (2-core Xeon, SmolLM2-135M, float32, 64 tokens; RESULTS.md): rung 5 40.8 -> 21.3 s per
generation with 2 engines (1.92x); 1,104 bytes per generation; same final weights.
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # tiny_model

import es_llm_vllm as rung5  # noqa: E402
import llm_ray  # noqa: E402
import llm_engines  # noqa: E402
import llm_support as support  # noqa: E402
from llm_tasks import make_task  # noqa: E402


def run(engine, tokenizer, args, generations):
    """`generations` ES generations of rung 5's es_generation: (seconds, bytes each, final checksum)."""
    task = make_task(args)
    chat = support.make_chat(engine, tokenizer)
    seconds, traffic = [], []
    for g in range(1, generations + 1):
        before, t0 = getattr(engine, "traffic", 0), time.perf_counter()
        rung5.es_generation(engine, chat, task, task.train, args, g, support.Stopwatch())
        seconds.append(time.perf_counter() - t0)
        traffic.append(getattr(engine, "traffic", 0) - before)
    return seconds, traffic, engine.checksum()


def compare(model, tokenizer, flags, a):
    """One engine in this process, then a pool of a.engines on the local Ray: the bench's numbers."""
    one_args = rung5.parse_args(flags)
    one = rung5.make_engine(one_args, model, tokenizer)
    s1, _, sum1 = run(one, tokenizer, one_args, a.generations)
    one.close()
    pool_args = rung5.parse_args(flags + ["--engines", str(a.engines)])
    t0 = time.perf_counter()
    pool = llm_ray.engines(rung5.make_engine, rung5.evaluate_members, pool_args, model, tokenizer)
    start = time.perf_counter() - t0
    sN, bytes_per_gen, sumN = run(pool, tokenizer, pool_args, a.generations)
    pool.close()
    med1, medN = statistics.median(s1[1:] or s1), statistics.median(sN[1:] or sN)
    return {"seconds_per_generation_1": s1, f"seconds_per_generation_{a.engines}": sN,
            "median_1": round(med1, 3), f"median_{a.engines}": round(medN, 3),
            "ratio_time_N_over_1": round(medN / med1, 3), "speedup_1_over_N": round(med1 / medN, 3),
            "pool_start_s": round(start, 1), "bytes_per_generation": bytes_per_gen, "same_final_weights": sum1 == sumN}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="model folder (empty: a tiny random model from bench/tiny_model.py)")
    p.add_argument("--rungs", default="5", help="5 (es_llm_vllm.py): the rung that runs on several engines")
    p.add_argument("--engines", type=int, default=2, help="engines of the pool (Ray actors)")
    p.add_argument("--cpus", type=int, default=2, help="cores for the single engine and for the local Ray")
    p.add_argument("--population-size", type=int, default=8, help="members per generation (mirrored pairs)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit")
    p.add_argument("--generations", type=int, default=4, help="generations per engine setup (the first is warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.add_argument("--out", default="studies/results/ray_engines.json", help="where the JSON result is written")
    a = p.parse_args(argv)
    if a.rungs != "5" or a.engines < 2 or min(a.cpus, a.generations) < 1:
        p.error("--rungs takes 5 (rung 5 is the rung with several engines), --engines must be >= 2, "
                "--cpus and --generations >= 1")
    model = a.model
    if not model:
        from tiny_model import build_tiny_model
        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0, counter=True))
    tokenizer = llm_engines.load_model_files(model)[0]
    torch.set_num_threads(a.cpus)
    llm_engines.NOISE_THREADS = a.cpus
    llm_ray.start_ray(num_cpus=a.cpus)
    result = {"model": a.model or "tiny random Llama (bench/tiny_model.py, hidden 128)",
              "population_size": a.population_size, "max_new_tokens": a.max_new_tokens, "dtype": a.dtype,
              "cpus": a.cpus, "engines": a.engines,
              "torch_threads": {"one engine": a.cpus, "each pool engine": max(1, a.cpus // a.engines)}}
    common = ["--engine", "hf", "--model", model, "--dtype", a.dtype, "--max-new-tokens", str(a.max_new_tokens),
              "--population-size", str(a.population_size)]
    for name in a.rungs.split(","):
        flags = common + ["--sigma", "0.01", "--lr", "1e-3"]
        result[f"rung{name}"] = r = compare(model, tokenizer, flags, a)
        print(f"rung {name}: {r['median_1']:.2f} s per generation with 1 engine, {r[f'median_{a.engines}']:.2f} s "
              f"with {a.engines} ({r['speedup_1_over_N']:.2f}x), {max(r['bytes_per_generation'])} bytes per generation "
              f"at most, same final weights: {r['same_final_weights']}", flush=True)
    import ray
    ray.shutdown()
    print(json.dumps(result, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
