"""bench/memory.py: its two probes see known allocations; on a small random Llama an ES generation
holds 6 bytes per parameter at rest (bf16 weights + float32 master) against Adam's 4 (float32
weights), and peaks below one Adam step; rung 6's adapter generation holds 2 (bf16 weights, no
master) and its peak grows with the population (one call of N x prompts rows), rung 5's does not.
Results of older runs (no adapter method) still replot."""
import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import memory  # noqa: E402

MiB = 2**20


def test_allocator_probe_sees_a_known_allocation():
    def step():
        a = torch.ones(8 * MiB // 4)  # 8 MiB, freed before b exists
        del a
        b = torch.ones(3 * MiB // 4)
        c = torch.ones(2 * MiB // 4)  # peak: b + c = 5 MiB
        del b, c
    peak, events = memory.allocator_peak(step)
    assert 8 * MiB <= peak < 8 * MiB + 64 * 1024
    assert events >= 6


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_rss_probe_resets_the_peak_and_sees_a_touched_block():
    big = torch.ones(96 * MiB // 4)  # raise the peak first
    del big
    memory.release_free_memory()
    base = memory.proc_status_kib("VmRSS")
    if not memory.reset_peak_rss():
        pytest.skip("kernel refuses to reset the peak RSS")
    assert memory.proc_status_kib("VmHWM") - base < 16 * 1024  # the earlier 96 MiB no longer counts
    block = torch.ones(40 * MiB // 4)
    del block
    grown = (memory.proc_status_kib("VmHWM") - base) / 1024
    assert 39 <= grown < 60


def test_tied_and_viewed_tensors_count_once():
    w = torch.zeros(1000)
    assert memory.tensor_bytes([w, w[:10], w.view(10, 100), torch.zeros(10)]) == 4000 + 40


def test_language_model_es_below_adam_end_to_end(tmp_path):
    summary = memory.main(["--parts", "lm", "--model", "tiny", "--batch", "2", "--new-tokens", "4",
                           "--methods", "es,adam", "--jobs", "2", "--out-dir", str(tmp_path)])
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("bench_memory"))
    assert (run_dir / "memory.png").stat().st_size > 0
    raw = json.loads((run_dir / "results.json").read_text())["raw"]["lm"]
    n = raw["es_rss"]["params"]
    assert n == raw["adam_rss"]["params"] > 1_000_000
    # at rest: bf16 weights + float32 master = 6 bytes per parameter; Adam's float32 weights = 4
    assert abs(raw["es_alloc"]["static_mib"] * MiB / n - 6) < 0.05
    assert 4 <= raw["adam_alloc"]["static_mib"] * MiB / n < 4.05  # + the token-id tensors
    # Adam's step adds gradients and two moments (12 bytes/parameter) on top: ES stays far below
    for view in ("rss", "alloc"):
        assert summary[f"lm_{view}"]["adam_peak_mib"] * MiB / n > 16
        assert summary[f"lm_{view}"]["ratio"] < 0.75
    # independent members: no cached noise of the mirrored pair (4 bytes/parameter), but then the
    # noise of one tensor at a time is drawn fresh; the largest, the embedding, is 40% of this model:
    # the peak drops by 4 * (1 - 0.4) = 2.4 bytes/parameter
    single = memory.main(["--parts", "lm", "--model", "tiny", "--batch", "2", "--new-tokens", "4", "--methods", "es",
                          "--no-es-mirrored", "--out-dir", str(tmp_path / "single")])
    saved = (summary["lm_alloc"]["es_peak_bytes_per_param"] - single["lm_alloc"]["es_peak_bytes_per_param"])
    assert 2.2 < saved < 2.6


def test_adapter_generation_holds_no_master_and_grows_with_the_population(tmp_path):
    """The allocator view in this process (no child processes: fast). Rung 6 puts N members x 2
    prompts into one generate call, so its activations and KV cache grow with N; rung 5 runs one
    member at a time (its peak is the same at N = 2 and N = 8)."""
    torch.set_num_threads(1)
    model_dir = memory.save_random_llama(tmp_path / "tiny", 192, 6, 3, 1, 512, 8192, 0)
    args = memory.parse_args(["--model", "tiny", "--batch", "2", "--new-tokens", "4"])
    prompts, answers = memory.lm_inputs(args, model_dir, False)
    spec = dict(vars(args), part="lm", prompts=prompts, answers=answers)
    lm = {"title": "random Llama, 2 prompts x 4 new tokens"}  # report()'s input; the N = 8 runs stay in it
    per_param = {}
    for method in ("adapter", "es"):
        for n in (2, 8):
            step, alive, params = memory.lm_setup(dict(spec, population_size=n), method, model_dir, 0)
            static = memory.tensor_bytes(alive)
            growth, _ = memory.allocator_peak(step)
            per_param[(method, n)] = {"static": static / params, "peak": (static + growth) / params, "growth": growth}
            lm[(method, "alloc")] = {"peak_mib": (static + growth) / MiB, "static_mib": static / MiB,
                                    "loaded_mib": static / MiB, "seconds": 0.0, "params": params}
            del step, alive
    # at rest: bf16 weights (2 bytes/parameter) + the rank-1 float32 adapter (~0.02 here), no master;
    # rung 5 holds bf16 weights + a float32 master: 6
    assert 2 < per_param[("adapter", 2)]["static"] < 2.05
    assert abs(per_param[("es", 2)]["static"] - 6) < 0.01
    # rung 6: 4x the members -> 4x the rows of the one generate call -> ~4x the step's growth
    assert 3.5 < per_param[("adapter", 8)]["growth"] / per_param[("adapter", 2)]["growth"] < 4.5
    # rung 5: members one after another: the peak does not depend on N
    assert abs(per_param[("es", 8)]["peak"] / per_param[("es", 2)]["peak"] - 1) < 0.01
    assert per_param[("adapter", 8)]["peak"] < per_param[("es", 8)]["peak"]
    # the table and the plot take the third method (results here: N = 8)
    summary = memory.report({"lm": lm}, tmp_path, "test", 0.0)
    assert summary["lm_alloc"]["adapter_es_ratio"] == pytest.approx(
        per_param[("adapter", 8)]["peak"] / per_param[("es", 8)]["peak"])
    assert summary["lm_alloc"]["ratio"] is None and (tmp_path / "memory.png").stat().st_size > 0


def test_replot_of_a_run_without_the_adapter_method(tmp_path):
    saved = os.path.join(os.path.dirname(memory.__file__), "results", "memory_results.json")
    shutil.copy(saved, tmp_path / "results.json")
    summary = memory.main(["--replot", str(tmp_path)])
    old = json.loads(open(saved).read())["summary"]
    assert summary["lm_rss"]["ratio"] == pytest.approx(old["lm_rss"]["ratio"])
    assert summary["lm_rss"]["adapter_ratio"] is None and "adapter_peak_mib" not in summary["lm_rss"]
    assert (tmp_path / "memory.png").stat().st_size > 0
