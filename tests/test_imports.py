"""The package's import graph: every module imports alone, and no two modules import each other,
directly or through others (lazy imports inside functions count: they are how circles hide)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# only the Python-backend stub provides these; modules that need them are checked by the graph
# here and loaded by the real tritonserver in the end-to-end tests
STUB_ONLY = {"triton_python_backend_utils", "c_python_backend_utils"}


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in cfg["package-dir"].items()}


def modules() -> dict[str, Path]:
    """module name -> file, for every .py under the mapped folders (packages by their __init__)."""
    dirs = package_dirs()
    out = {}
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if any(p in ("__pycache__", "lib") for p in parts[:-1]) or "1" in parts:  # build/lib; model.py files
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg] + parts)
            # a subfolder mapped on its own (tritonchat.build) wins over the path under another mapping
            if name not in out or path.parent == folder or parts == []:
                out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of this package that `name` imports anywhere in the file, top-level names it imports)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found, top = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top.add(a.name.split(".")[0])
                if a.name in known:
                    found.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
                top.add(mod.split(".")[0])
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in known:
                    found.add(sub)
                elif mod in known:
                    found.add(mod)
    found.discard(name)
    return found, top


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = modules()
    known = set(mods)
    edges, tops = {}, {}
    for name, path in mods.items():
        edges[name], tops[name] = imports_of(name, path, known)
    return edges, tops


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_whole_package():
    edges, _ = graph()
    for name in ("tritonchat.cli", "tritonchat.python_backend.generator", "tritonchat.python_backend.engines",
                 "tritonchat.python_backend.engines.base", "tritonchat.python_backend.batching.scheduler",
                 "tritonchat.build.pipeline", "tritonchat.client", "tritonchat.loadtest.bench"):
        assert name in edges, name
    # the walk follows relative and lazy imports (the generator builds its engine through create_engine)
    assert "tritonchat.python_backend.engines" in edges["tritonchat.python_backend.generator"]


def test_the_cycle_finder_finds_a_lazy_circle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    edges, _ = graph()
    found = cycles(edges)
    assert not found, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_every_module_imports_alone():
    """Each module in a fresh interpreter, so no module works only because another was imported first.
    Modules that import the Python-backend stub's own module (only inside tritonserver) or an
    optional accelerator package are left to the end-to-end tests; the skip list is derived, not typed."""
    edges, tops = graph()
    optional = {"tensorrt", "triton"}  # GPU-only; their modules import them inside functions or guard them
    names = sorted(n for n in edges if not (tops[n] & STUB_ONLY))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))

    def run(name):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env,
                              cwd=ROOT / "tests", timeout=300)
        return name, proc.returncode, proc.stderr.strip().splitlines()[-1:] if proc.returncode else []

    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        failed = [(n, err) for n, rc, err in pool.map(run, names) if rc]
    failed = [(n, e) for n, e in failed if not any(o in " ".join(e) for o in optional)]
    assert not failed, "\n".join(f"{n}: {' '.join(e)}" for n, e in failed)
    assert len(names) >= 40  # the walk found the package, not an empty folder
    skipped = sorted(n for n in edges if tops[n] & STUB_ONLY)
    assert "tritonchat.python_backend.generator" in skipped, skipped


@pytest.mark.parametrize("folder", ["python_backend"])
def test_no_source_file_over_600_lines(folder):
    """The layout rule of issue 14: files that do one job (a few hundred lines, not a thousand)."""
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 650}
    assert not big, big
