"""bench/memory.py: its two probes see known allocations; on a small random Llama an ES generation
holds 6 bytes per parameter at rest (bf16 weights + float32 master) against Adam's 4 (float32
weights), and peaks below one Adam step."""
import json
import os
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
                           "--jobs", "2", "--out-dir", str(tmp_path)])
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
