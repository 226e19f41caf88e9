"""Several engines with Ray (es_llm_ray.py): wall time per ES generation with 1 vs N engines, and the
bytes that cross between the driver and the engines per generation.

Both setups are es_llm_ray.py's own engines (llm_engines.Engines of es_llm_ray.EngineActor) on a local
Ray with `--cpus` cores: 1 engine with all `--cpus` threads (rung 5's work in one process), then
`--engines` engines with cpus/engines threads each. Both run es_llm_ray.es_generation for
`--generations` generations from the same seed; the first generation of each is reported apart
(warm-up), the rest as the median.
Bytes: the pickled arguments and results of every call to the engines (llm_engines.Engines.traffic); Ray
adds a few hundred bytes of its own per call. The weights never travel.

Run:   python studies/ray_engines.py                       (a tiny random model, built here, ~2 minutes)
       python studies/ray_engines.py --model PATH --max-new-tokens 64    (a real model folder)
See:   seconds per generation for 1 and N engines, their ratio, bytes per generation (about 1 kB),
       and whether both reached the same final weights.
Measured (2-core Xeon, SmolLM2-135M, float32, 64 tokens; RESULTS.md): 45.4 -> 22.7 s per generation
with 2 engines (2.00x), 1,136 bytes per generation; same final weights.
"""

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # tiny_model

import es_llm_ray  # noqa: E402
import llm_engines  # noqa: E402
import llm_tasks  # noqa: E402
from llm_tasks import make_task  # noqa: E402


def run(model, flags, engines, generations):
    """`generations` ES generations of es_llm_ray.es_generation on `engines` engines: (seconds each,
    bytes each, final checksum, seconds to start the engines)."""
    args = es_llm_ray.parse_args(flags + ["--engines", str(engines)])
    task = make_task(args)
    t0 = time.perf_counter()
    pool = llm_engines.Engines(functools.partial(es_llm_ray.EngineActor, args, model), engines, "cpu")
    pool.check([c for _, _, c in pool.each("loading the model", "info")], "after loading the model")
    start = time.perf_counter() - t0
    seconds, traffic = [], []
    for g in range(1, generations + 1):
        before, t0 = pool.traffic, time.perf_counter()
        es_llm_ray.es_generation(pool, task.train, args, g, llm_tasks.Stopwatch())
        seconds.append(time.perf_counter() - t0)
        traffic.append(pool.traffic - before)
    final = pool.checksums[-1][0]
    pool.close()
    return seconds, traffic, final, start


def compare(model, flags, a):
    """1 engine, then a.engines engines, on the local Ray: the bench's numbers."""
    s1, _, sum1, _ = run(model, flags, 1, a.generations)
    sN, bytes_per_gen, sumN, start = run(model, flags, a.engines, a.generations)
    med1, medN = statistics.median(s1[1:] or s1), statistics.median(sN[1:] or sN)
    return {"seconds_per_generation_1": s1, f"seconds_per_generation_{a.engines}": sN,
            "median_1": round(med1, 3), f"median_{a.engines}": round(medN, 3),
            "ratio_time_N_over_1": round(medN / med1, 3), "speedup_1_over_N": round(med1 / medN, 3),
            "pool_start_s": round(start, 1), "bytes_per_generation": bytes_per_gen, "same_final_weights": sum1 == sumN}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="model folder (empty: a tiny random model from bench/tiny_model.py)")
    p.add_argument("--engines", type=int, default=2, help="engines of the pool (Ray actors), compared with 1")
    p.add_argument("--cpus", type=int, default=2, help="cores of the local Ray (1 engine gets them all)")
    p.add_argument("--population-size", type=int, default=8, help="members per generation (mirrored pairs)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit")
    p.add_argument("--generations", type=int, default=4, help="generations per engine setup (the first is warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.add_argument("--out", default="studies/results/ray_engines.json", help="where the JSON result is written")
    a = p.parse_args(argv)
    if a.engines < 2 or a.engines > a.cpus or a.generations < 1:
        p.error("--engines must be >= 2 and <= --cpus, --generations >= 1")
    model = a.model
    if not model:
        from tiny_model import build_tiny_model
        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0, counter=True))
    llm_engines.start_ray(num_cpus=a.cpus)
    result = {"model": a.model or "tiny random Llama (bench/tiny_model.py, hidden 128)",
              "population_size": a.population_size, "max_new_tokens": a.max_new_tokens, "dtype": a.dtype,
              "cpus": a.cpus, "engines": a.engines,
              "torch_threads": {"one engine": a.cpus, "each pool engine": max(1, a.cpus // a.engines)}}
    flags = ["--engine", "hf", "--model", model, "--dtype", a.dtype, "--max-new-tokens", str(a.max_new_tokens),
             "--population-size", str(a.population_size), "--sigma", "0.01", "--lr", "1e-3",
             "--train-prompts", "2"]  # the paper's 2 prompts, as measured (RESULTS.md)
    result["rung5"] = r = compare(model, flags, a)  # es_llm_ray.py is rung 5 on N engines
    print(f"es_llm_ray: {r['median_1']:.2f} s per generation with 1 engine, {r[f'median_{a.engines}']:.2f} s "
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
