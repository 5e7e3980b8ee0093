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


def test_llama_package_imports_nothing_of_the_project():
    for path in (ROOT / "training" / "llama").rglob("*.py"):
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
