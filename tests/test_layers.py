"""House rules that keep the code base honest: imports point one way with no circle, the model layer never
reads Redis, and every option object is built from the one `Settings` with defaults that agree."""

from __future__ import annotations

import ast
from dataclasses import asdict
from pathlib import Path

from evaluation.think_ahead import ThinkAheadRecommender
from model.onerec import OneRecConfig
from model.policy import PolicyConfig
from offline_worker.engine_interface import EngineConfig
from offline_worker.refresh import RefreshOptions
from offline_worker.vllm_engine import VLLMOptions
from services.catalog import HISTORY_CAP
from services.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["services", "model", "evaluation", "offline_worker", "online_api"]
# a package may import the ones before it in this order, never one after it
LAYER = {"services": 0, "model": 1, "evaluation": 2, "offline_worker": 2, "online_api": 2}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def _imports(path: Path) -> set[str]:
    """Every absolute import of the file, module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for t in _imports(f):
            while t and t not in mods:
                t = t.rpartition(".")[0]
            # a package's own __init__ re-exporting its submodules is not an edge back up
            if t and t != m and not m.startswith(t + "."):
                graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_and_layers_point_down() -> None:
    graph = import_graph()
    assert cycles(graph) == []
    upward = [(m, t) for m, ts in graph.items() for t in ts if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert upward == []
    sideways = [(m, t) for m, ts in graph.items() for t in ts
                if LAYER[m.split(".")[0]] == 2 and t.split(".")[0] != m.split(".")[0] and LAYER[t.split(".")[0]] == 2]
    assert sideways == []  # evaluation, offline_worker and online_api do not import each other
    vllm_in_api = [m for m, f in _modules().items() if m.startswith("online_api") and "vllm" in
                   {n.split(".")[0] for n in _imports(f)}]
    assert vllm_in_api == []


def test_model_layer_never_reads_redis() -> None:
    readers = [m for m, f in _modules().items() if m.startswith("model")
               and "redis" in {n.split(".")[0] for n in _imports(f)}]
    assert readers == []


def test_served_code_never_imports_the_harness() -> None:
    """`services.harness` (redis-server, uvicorn and port helpers) is for tests, benchmarks and the demo only."""
    users = [m for m, f in _modules().items() if m != "services.harness"
             and any(n == "services.harness" or n.startswith("services.harness.") for n in _imports(f))]
    assert users == []


def _parses_arguments(source: str) -> bool:
    """Does the code build a command-line parser (``argparse.ArgumentParser``, imported either way)?"""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "ArgumentParser":
            return True
        if isinstance(node, ast.Name) and node.id == "ArgumentParser":
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "argparse" and \
                any(a.name == "ArgumentParser" for a in node.names):
            return True
    return False


def _is_cli(module: str) -> bool:
    return module.rpartition(".")[2] in ("__main__", "cli")


def test_cli_detector_sees_both_spellings() -> None:
    assert _parses_arguments("import argparse\np = argparse.ArgumentParser()")
    assert _parses_arguments("from argparse import ArgumentParser\np = ArgumentParser()")
    assert not _parses_arguments("import argparse\ndef f(args: argparse.Namespace) -> None: ...")
    assert _is_cli("model.think.__main__") and _is_cli("model.cli") and not _is_cli("model.think.stages")


def test_model_parses_arguments_only_in_cli_modules_nobody_imports() -> None:
    """House rule 11: under `model/`, argument parsing sits in ``__main__.py`` / ``cli.py`` on top of the library
    modules, and no library, service, benchmark or script module imports those (tests may drive them)."""
    mods = _modules()
    parsers = [m for m, f in mods.items() if m.startswith("model") and _parses_arguments(f.read_text())]
    assert parsers and [m for m in parsers if not _is_cli(m)] == []
    importers = {m: f for m, f in mods.items()} | {
        ".".join(f.relative_to(ROOT).with_suffix("").parts): f
        for d in ("benchmarks", "scripts") for f in (ROOT / d).rglob("*.py")}
    cli_imports = [(m, t) for m, f in importers.items() for t in _imports(f)
                   if t.startswith("model.") and any(_is_cli(p) for p in (t, t.rpartition(".")[0])) and t != m]
    assert cli_imports == []


def test_option_objects_agree_with_one_settings() -> None:
    """Defaults: every option object run without Settings equals the one built from default Settings; and a
    changed Settings reaches the online and the offline objects alike."""
    s = Settings()
    assert EngineConfig() == EngineConfig.from_settings(s)
    assert RefreshOptions() == RefreshOptions.from_settings(s)
    assert VLLMOptions() == VLLMOptions.from_settings(s)
    # one history cap: evaluation splits, stored histories, offline prompts, the online model's window
    assert s.history_max == s.think_history_cap == OneRecConfig().max_len == HISTORY_CAP
    assert EngineConfig.from_settings(s).k_a == s.prefix_beam_a

    changed = Settings(beam=7, prefix_weight=0.5, own_prefixes=3, exclude_consumed=False, prefix_beam_a=5,
                       reasoning_samples=4, history_max=30, think_history_cap=20, refresh_chunk=17, item_weight=0.75,
                       think_items=12)
    policy = PolicyConfig.from_settings(changed)
    # option fields are named like their settings
    assert asdict(policy) == {"beam": 7, "prefix_weight": 0.5, "own_prefixes": 3,
                              "own_prefix_floor": changed.own_prefix_floor, "exclude_consumed": False,
                              "use_cached": True, "item_weight": 0.75}
    assert all(getattr(changed, f) == v for f, v in asdict(policy).items() if f != "use_cached")
    engine, refresh = EngineConfig.from_settings(changed), RefreshOptions.from_settings(changed)
    assert (engine.k_a, engine.samples, engine.items) == (5, 4, 12)
    assert (refresh.history_max, refresh.history_cap, refresh.chunk) == (30, 20, 17)
    # overrides (command-line flags) win; None means "not given"
    assert EngineConfig.from_settings(changed, beam_a=None, samples=2).samples == 2
    assert EngineConfig.from_settings(changed, beam_a=None).k_a == 5


def test_evaluation_takes_the_policy_it_is_given() -> None:
    """The evaluation recommender has no policy options of its own (they would be a second source)."""
    params = ThinkAheadRecommender.__init__.__code__.co_varnames[: ThinkAheadRecommender.__init__.__code__.co_argcount]
    assert params == ("self", "onerec", "source", "policy", "popularity")
