"""The house's arrows, read from the source (ast, nothing imported): no import cycle among the
top-level modules, no support module importing a rung (es_*.py), no rung importing another rung,
and nothing under bench/ or studies/ importing the tests' helpers (tests/)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {p.stem for p in (ROOT / "tests").glob("*.py")}


def imported(path):
    """Top-level module names a file imports, anywhere in it (lazy imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def graph():
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    return {m: imported(p) & set(modules) - {m} for m, p in modules.items()}


def cycles(edges):
    """Every module that lies on an import cycle, with the cycle found from it."""
    found = {}
    for start in edges:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    found[start] = path + [start]
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def problems(edges):
    rungs = {m for m in edges if m.startswith("es_")}
    out = [f"import cycle: {' -> '.join(c)}" for c in cycles(edges).values()]
    out += [f"support module {m} imports rung {r}" for m in sorted(set(edges) - rungs) for r in sorted(edges[m] & rungs)]
    out += [f"rung {m} imports rung {r}" for m in sorted(rungs) for r in sorted(edges[m] & rungs)]
    return out


def test_top_level_modules_import_downwards_only():
    assert problems(graph()) == []


def test_the_check_catches_a_cycle_a_support_module_importing_a_rung_and_a_rung_importing_a_rung():
    edges = graph()
    assert "llm_tasks" in edges and "llm_engines" in edges and "es_llm_vllm" in edges
    bad = {**edges, "llm_engines": edges["llm_engines"] | {"llm_tasks"},
           "llm_tasks": edges["llm_tasks"] | {"llm_engines"}}
    assert any(p.startswith("import cycle") for p in problems(bad))
    bad = {**edges, "llm_tasks": edges["llm_tasks"] | {"es_llm_vllm"}}
    assert "support module llm_tasks imports rung es_llm_vllm" in problems(bad)
    bad = {**edges, "es_llm_lora": edges["es_llm_lora"] | {"es_llm_vllm"}}
    assert "rung es_llm_lora imports rung es_llm_vllm" in problems(bad)


def test_bench_and_studies_do_not_import_the_tests_helpers():
    scripts = [p for folder in ("bench", "studies") for p in (ROOT / folder).glob("*.py")]
    assert scripts
    bad = {p.relative_to(ROOT).as_posix(): sorted(imported(p) & TESTS) for p in scripts}
    assert {k: v for k, v in bad.items() if v} == {}


def test_an_llm_rung_reaches_two_other_files_the_task_module_and_the_engine_plumbing():
    """Following one generation of an LLM rung opens at most two other files of this repository:
    llm_tasks.py (reward, chat, the run's record) and llm_engines.py (flags, engines, checkpoints)."""
    edges = graph()
    llm_rungs = sorted(m for m in edges if m.startswith("es_llm_"))
    assert llm_rungs == ["es_llm_eggroll", "es_llm_lora", "es_llm_ray", "es_llm_vllm"]
    for rung in llm_rungs:
        assert edges[rung] == {"llm_tasks", "llm_engines"}, rung
    assert edges["llm_tasks"] == set() and edges["llm_engines"] == set()
