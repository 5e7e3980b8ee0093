"""Production settings refuse unsafe configurations; `check --deploy` is clean under them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    result = run_manage("check", SECRET_KEY="x" * 60, DEBUG="true", ALLOWED_HOSTS="rlhf.example.org")
    assert result.returncode != 0
    assert "DEBUG must not be enabled" in result.stderr


def test_check_deploy_is_clean_under_production_settings():
    result = run_manage(
        "check", "--deploy", "--fail-level", "WARNING",
        SECRET_KEY="k3y-" + "a1B2c3D4e5F6g7H8i9J0" * 3, ALLOWED_HOSTS="rlhf.example.org",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
