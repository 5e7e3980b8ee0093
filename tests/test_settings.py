"""Production settings refuse unsafe configurations; `check --deploy` is clean under them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings.base import DEVELOPMENT_SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent
GOOD_KEY = "k3y-" + "a1B2c3D4e5F6g7H8i9J0" * 3


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "ALLOWED_HOSTS")}
    base.update(DJANGO_SETTINGS_MODULE="config.settings.production", **env)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120
    )


def test_production_refuses_to_start_without_secret_key():
    result = run_manage("check", ALLOWED_HOSTS="rlhf.example.org")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_production_refuses_debug():
    result = run_manage("check", SECRET_KEY=GOOD_KEY, DEBUG="true", ALLOWED_HOSTS="rlhf.example.org")
    assert result.returncode != 0
    assert "DEBUG must not be enabled" in result.stderr


def test_check_deploy_is_clean_under_production_settings():
    result = run_manage(
        "check", "--deploy", "--fail-level", "WARNING",
        SECRET_KEY=GOOD_KEY, ALLOWED_HOSTS="rlhf.example.org",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("x", "at least 50 characters"),
        ("k3y-" + "a1B2c3D4e5" * 4, "at least 50 characters"),  # 44 characters
        ("ab" * 30, "5 distinct ones"),
        (DEVELOPMENT_SECRET_KEY, "the development key"),
    ],
)
def test_production_refuses_a_weak_secret_key(key, message):
    result = run_manage("check", SECRET_KEY=key, ALLOWED_HOSTS="rlhf.example.org")
    assert result.returncode != 0
    assert message in result.stderr


def test_load_demo_refuses_production_settings_before_touching_the_database():
    # An unreachable database: had the command tried it, it would fail with a connection error instead.
    result = run_manage(
        "load_demo", SECRET_KEY=GOOD_KEY, ALLOWED_HOSTS="rlhf.example.org",
        DATABASE_URL="postgres://nobody@127.0.0.1:9/none",
    )  # fmt: skip
    assert result.returncode != 0
    assert "refused under these settings" in result.stderr
    assert "connection" not in result.stderr.lower()


PRODUCTION_CLIENT = """
import django, json
django.setup()
from django.test import Client
client = Client()
print(json.dumps({path: client.get(path, secure=True).status_code for path in ("/api/schema/", "/api/schema/ui/")}))
"""


def test_schema_and_its_ui_need_a_sign_in_under_production_settings(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "ALLOWED_HOSTS")}
    base.update(DJANGO_SETTINGS_MODULE="config.settings.production", SECRET_KEY=GOOD_KEY, ALLOWED_HOSTS="testserver",
                STATIC_ROOT=str(tmp_path / "static"))  # fmt: skip
    # As deployed: static files collected (the refusal page, 403.html, is a page of the site with its styles).
    collected = subprocess.run([sys.executable, "manage.py", "collectstatic", "--no-input", "-v0"], cwd=ROOT, env=base,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert collected.returncode == 0, collected.stderr
    result = subprocess.run(
        [sys.executable, "-c", PRODUCTION_CLIENT], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"/api/schema/": 403, "/api/schema/ui/": 403}
