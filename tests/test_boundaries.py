"""The web process never imports torch, rewards or training (ARCHITECTURE.md, "Boundaries")."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB_APPS = ["annotation", "frontend", "config"]
FORBIDDEN = ("torch", "rewards", "training", "transformers", "safetensors", "sentencepiece", "numpy")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("app", WEB_APPS)
def test_web_apps_do_not_import_training_code(app):
    offenders = []
    for path in (ROOT / app).rglob("*.py"):
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_llama_package_and_engine_import_nothing_of_the_project():
    """The ground floor: training.llama and the training engine import no Django, rewards or policy trainer."""
    for path in [*(ROOT / "training" / "llama").rglob("*.py"), ROOT / "training" / "engine.py"]:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in ("django", "annotation", "rewards", "config", "frontend"), (
                f"{path} imports {name}"
            )
            if top == "training":
                assert name.startswith("training.llama"), f"{path} imports {name}"


def test_serving_the_web_app_loads_no_torch():
    """Import the WSGI app and resolve every URL module: torch must not end up in sys.modules."""
    code = (
        "import sys, django; from config.wsgi import application; from django.urls import get_resolver; "
        "get_resolver().url_patterns; import annotation.admin, annotation.api.views; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'rewards', 'training')"
        " and m not in ('rewards', 'rewards.apps', 'rewards.models', 'training', 'training.apps', 'training.models'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


PROJECT_PACKAGES = ("annotation", "frontend", "config", "rewards", "training")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its code (function-level imports included)."""
    modules = {
        _module_name(path): path
        for package in PROJECT_PACKAGES for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts and "tests" not in path.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def test_no_import_cycles_between_project_modules():
    """No module imports, at any depth and at any place in its code, a module that imports it back."""
    graph = project_import_graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, sorted(set(cycles))[:10]
