"""The house (issue 26): no import cycle, imports flow down docs/architecture.md's tables, which
list every module; analysis/ loads no torch; the wheel holds every sub-package; no long function."""
import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hybrid_lora"
DOC = PKG.parent / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """{dotted name ("hybrid_lora.analysis.stats", a package as "hybrid_lora.analysis"): its file}."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (inside functions too)."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and n != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, mods) for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `edges` as [a, b, ..., a], or None (depth-first search)."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (c := visit(n, path + [n])):
                return c
        state[m] = "done"
        return None

    for m in edges:
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_counting_imports_inside_functions():
    assert find_cycle(graph()) is None


def doc_tables() -> list[list[str]]:
    """The module names of each table of docs/architecture.md's rooms, in order."""
    rooms = DOC.read_text(encoding="utf-8").split("## The rooms", 1)[1].split("\n## ", 1)[0]
    return [re.findall(r"^\| `([^`]+)` \|", part, re.M) for part in rooms.split("\n### ")[1:]]


def test_the_architecture_page_lists_every_module_once():
    listed = [m for table in doc_tables() for m in table]
    actual = {n.removeprefix("hybrid_lora.") or "__init__" for n in modules()
              if n not in ("hybrid_lora.allocation", "hybrid_lora.analysis")}
    actual = {"__init__" if n == "hybrid_lora" else n for n in actual}
    assert len(listed) == len(set(listed)) and set(listed) == actual, set(listed) ^ actual


def test_imports_flow_down_the_architecture_tables():
    table = {f"hybrid_lora.{m}" if m != "__init__" else "hybrid_lora": i
             for i, ms in enumerate(doc_tables()) for m in ms}
    table.update({"hybrid_lora.allocation": table["hybrid_lora.allocation.schedule"],
                  "hybrid_lora.analysis": table["hybrid_lora.analysis.stats"]})
    upward = [(a, b) for a, bs in graph().items() for b in bs if table[b] > table[a]]
    assert not upward, f"imports against the flow of docs/architecture.md: {upward}"


def test_analysis_imports_no_torch_anywhere():
    for name, path in modules().items():
        if name.startswith("hybrid_lora.analysis"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"^\s*(import|from)\s+(torch|transformers|peft|accelerate)\b", text, re.M), name
    loaded = [n for n in modules() if n.startswith("hybrid_lora.analysis")]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {loaded!r}]; "
            "print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_no_function_over_80_lines_outside_the_argument_parser():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and (name, node.name) != ("hybrid_lora.cli", "build_parser"):
                    long.append((name, node.name, n))
    assert not long


def test_the_wheel_holds_every_module_and_they_import_from_it(tmp_path):
    """A notebook's `pip install git+...` builds a wheel: a sub-package missing from pyproject.toml
    would be left out of it while the editable install of CI still passes."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(PKG.parent)], capture_output=True, text=True)
    if build.returncode and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("hybrid_lora-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(PKG.parent)).replace(os.sep, "/") for p in modules().values()}
    assert expected <= names, expected - names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    every = sorted(m for m in modules() if m != "hybrid_lora.__main__")  # (that one runs the CLI)
    code = (f"import importlib, hybrid_lora; [importlib.import_module(m) for m in {every!r}]; "
            "print(hybrid_lora.__file__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "site" / "hybrid_lora" / "__init__.py")
