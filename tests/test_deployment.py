"""The deployment as written: docker-compose.yml, Dockerfile, Dockerfile.gpu and .dockerignore.

Docker is not needed: the files are parsed (compose with PyYAML, the Dockerfiles by the small parser below) and
checked against rules that would have caught the first deployment's defects: `collectstatic` ran under the
development settings into a STATIC_ROOT under VAR_DIR that compose then moved (every page a 500 under the production
settings), the web healthcheck asked a host that ALLOWED_HOSTS refuses, the GPU image installed a Python its base
does not have, and nothing kept `.venv`, `.git` or `var/` out of the build context. Then the image's build is
replayed in a folder that stands for the container's `/` (its COPY steps through .dockerignore, its `manage.py`
steps with the image's environment), and gunicorn serves that copy with the web service's environment to a user
who signs in through the log-in page: every page of the frontend, the admin and the API schema UI, and the static
files they name.

Where `docker compose` exists, `docker compose config -q` checks the compose file too.
"""

import ast
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import pytest
import yaml
from django.db import connection
from django.http.request import validate_host
from django.urls import URLPattern, reverse
from packaging.specifiers import SpecifierSet

from config.health import HEALTH_PATH

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HOST = "rlhf.example.org"
# What README's deploy section has a user put in .env.
DOTENV = {"SECRET_KEY": "k3y-" + "a1B2c3D4e5F6g7H8i9J0" * 3, "POSTGRES_PASSWORD": "pg-pass-1", "ALLOWED_HOSTS": HOST}
PRODUCTION = "config.settings.production"
HEALTH_MIDDLEWARE = "config.health.HealthCheckMiddleware"
# Values the settings default to that only suit one machine: a deployment must give its own.
DEPLOYMENT_ENV = ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CACHE_URL", "ARTIFACTS_DIR")
# The Python each distribution ships as python3 (its apt has no other python3.N).
DISTRIBUTION_PYTHON = {"bookworm": "3.11", "trixie": "3.13", "jammy": "3.10", "ubuntu22.04": "3.10",
                       "noble": "3.12", "ubuntu24.04": "3.12"}  # fmt: skip
# Programs of the app images' healthchecks that pip installs (pyproject dependencies) rather than apt.
PIP_PROGRAMS = {"celery", "gunicorn", "python"}


# --- docker-compose.yml ---------------------------------------------------------------------------------------------


class MissingVariable(Exception):
    """`${NAME:?message}` with NAME unset: compose refuses the file."""


_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict):
    """Compose's interpolation: `$$`, `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`,
    `${NAME?error}`, `${NAME:+other}`, `${NAME+other}`, in every string of `value`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") if match.group("braced") is not None else match.group("plain")
        name, operator, argument = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]|)(.*)", expression, re.S).groups()
        current = env.get(name)
        present = bool(current) if operator.startswith(":") else current is not None
        if operator.endswith("-"):
            return current if present else argument
        if operator.endswith("?"):
            if not present:
                raise MissingVariable(f"{name}: {argument}")
            return current
        if operator.endswith("+"):
            return argument if present else ""
        return current or ""

    return _VARIABLE.sub(substitute, value)


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(dotenv: dict | None = None) -> dict[str, dict]:
    """The services as compose reads them with `dotenv` for .env (YAML merge keys resolved by PyYAML)."""
    return interpolate(compose_file()["services"], DOTENV if dotenv is None else dotenv)


def app_services() -> dict[str, dict]:
    """The services built from this repository (web, migrate, workers, beat)."""
    return {name: s for name, s in services().items() if "build" in s}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def build_of(service: dict) -> tuple[Path, Path]:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (ROOT / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def option(command: list[str], *names: str) -> str | None:
    """The value of a command-line option (`--bind 0.0.0.0:8000`, `-Q gpu`, `--bind=...`)."""
    for i, token in enumerate(command):
        if token in names and i + 1 < len(command):
            return command[i + 1]
        for name in names:
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def healthcheck_argv(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), test
    return rest if kind == "CMD" else shlex.split(rest[0])


def required_env_vars() -> set[str]:
    """Variables the settings read with no default: `env.str("SECRET_KEY")`, `env.list("ALLOWED_HOSTS")`, ..."""
    names = set()
    for path in (ROOT / "config/settings/base.py", ROOT / "config/settings/production.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "env"
                and len(node.args) == 1
                and isinstance(node.args[0], ast.Constant)
                and not any(keyword.arg == "default" for keyword in node.keywords)
            ):
                names.add(node.args[0].value)
    return names


def test_the_services_are_the_deployment():
    s = services()
    assert set(s) == {"postgres", "redis", "migrate", "web", "worker-cpu", "worker-gpu", "beat"}
    assert s["web"]["command"][:2] == ["gunicorn", "config.wsgi:application"], s["web"]["command"]
    assert s["migrate"]["command"][-3:] == ["manage.py", "migrate", "--no-input"]
    assert s["migrate"].get("restart") == "no", "migrate runs once"
    for name, service in app_services().items():
        assert environment(service).get("DJANGO_SETTINGS_MODULE") == PRODUCTION, name


def test_every_build_names_a_context_and_a_dockerfile_that_exist():
    for name, service in app_services().items():
        context, dockerfile = build_of(service)
        assert context.is_dir(), f"{name}: no build context {context}"
        assert dockerfile.is_file(), f"{name}: no {dockerfile}"
        assert dockerfile.name in DOCKERFILES, f"{name}: {dockerfile.name} is not checked here"
    assert build_of(services()["worker-gpu"])[1].name == "Dockerfile.gpu"
    assert {build_of(s)[1].name for n, s in app_services().items() if n != "worker-gpu"} == {"Dockerfile"}


def test_every_image_has_a_version_tag():
    for name, service in services().items():
        image = service.get("image", "")
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert image, f"{name}: no image"
        assert tag not in ("", "latest"), f"{name}: {image!r} needs a version tag, not latest or none"


def test_volumes_are_declared_and_the_artifacts_volume_is_shared_by_web_and_workers():
    declared = set(compose_file().get("volumes") or {})
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source!r} is not declared under volumes:"
    artifacts = {}
    for name, service in app_services().items():
        target = environment(service)["ARTIFACTS_DIR"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", []) if isinstance(v, str)}
        assert target in mounts, f"{name}: ARTIFACTS_DIR={target} is not on a volume"
        artifacts[name] = mounts[target]
    assert len(set(artifacts.values())) == 1, f"one artifacts volume for all: {artifacts}"
    assert {"web", "worker-cpu", "worker-gpu"} <= set(artifacts)


def test_depends_on_names_services_and_waits_for_them_to_be_healthy():
    s = services()
    for name, service in s.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, rule in depends.items():
            assert target in s, f"{name} depends on {target!r}, which is no service"
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in s[target], f"{name} waits for {target} to be healthy: it has no healthcheck"
            if rule.get("condition") == "service_completed_successfully":
                assert s[target].get("restart", "no") == "no", f"{target} must run once"
    for name in app_services():
        conditions = {t: r.get("condition") for t, r in s[name]["depends_on"].items()}
        assert conditions.get("postgres") == "service_healthy", name
        if name != "migrate":
            assert conditions.get("redis") == "service_healthy", name
            assert conditions.get("migrate") == "service_completed_successfully", name


def test_compose_gives_every_variable_the_production_settings_require():
    required = required_env_vars()
    assert {"SECRET_KEY", "ALLOWED_HOSTS"} <= required  # the rule reads the settings, not a list kept here
    for name, service in app_services().items():
        env = environment(service)
        missing = (required | set(DEPLOYMENT_ENV)) - {key for key, value in env.items() if value}
        assert not missing, f"{name} lacks {sorted(missing)}"
    # Without the .env of README's deploy section, compose refuses the file rather than starting without a key.
    for variable in DOTENV:
        with pytest.raises(MissingVariable, match=variable):
            services({k: v for k, v in DOTENV.items() if k != variable})


def test_readmes_env_example_names_the_variables_compose_requires():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy with Docker Compose", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"cat > \.env <<'ENV'\n(.*?)\nENV\n", section, re.S)
    assert example, "README's deploy section has no .env example"
    named = {line.split("=", 1)[0] for line in example.group(1).splitlines() if "=" in line}
    demanded = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", COMPOSE_FILE.read_text()))
    assert demanded <= named, f"compose requires {sorted(demanded - named)}, which README's .env example lacks"
    assert demanded == set(DOTENV)
    # GPU nodes: the CUDA build of the release pyproject.toml pins, not the CPU wheel.
    pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["ml"] if d.startswith("torch=="))
    gpu = section.split("### GPU workers", 1)[1]
    installs = [line for line in gpu.splitlines() if re.search(r"pip install .*\btorch==", line)]
    assert installs, "README's GPU section does not say how torch is installed"
    for line in installs:
        assert pin in line.split(), f"README installs {line!r}; pyproject.toml pins {pin}"
        assert "/whl/cpu" not in line, f"README's GPU install takes the CPU build: {line!r}"


def test_the_app_reaches_postgres_and_redis_by_their_service_names():
    s = services()
    pg = environment(s["postgres"])
    for name, service in app_services().items():
        env = environment(service)
        db = urlsplit(env["DATABASE_URL"])
        assert (db.scheme, db.hostname, db.port) == ("postgres", "postgres", 5432), name
        assert (db.username, db.password, db.path.strip("/")) == (
            pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]), name  # fmt: skip
        for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CACHE_URL"):
            url = urlsplit(env[key])
            assert (url.scheme, url.hostname) == ("redis", "redis"), f"{name}: {key}={env[key]}"
        assert len({urlsplit(env[k]).path for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CACHE_URL")}) == 3


def test_healthchecks_pass_as_written(settings_under):
    s = services()
    pg = environment(s["postgres"])
    argv = healthcheck_argv(s["postgres"])
    assert argv[0] == "pg_isready"
    assert (option(argv, "-U"), option(argv, "-d")) == (pg["POSTGRES_USER"], pg["POSTGRES_DB"])
    assert healthcheck_argv(s["redis"]) == ["redis-cli", "ping"]

    web = s["web"]
    argv = healthcheck_argv(web)
    urls = [token for token in argv if re.match(r"https?://", token)]
    assert len(urls) == 1, argv
    url = urlsplit(urls[0])
    headers = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token in ("-H", "--header")]
    host = next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("host:")), url.hostname)
    assert url.port == int(option(web["command"], "--bind", "-b").rsplit(":", 1)[1]), "not gunicorn's port"
    web_settings = settings_under("web")
    allowed = validate_host(host, web_settings["ALLOWED_HOSTS"])
    exempt = url.path == HEALTH_PATH and web_settings["MIDDLEWARE"][0] == HEALTH_MIDDLEWARE
    assert allowed or exempt, (
        f"the web healthcheck asks {host!r}, which ALLOWED_HOSTS={web_settings['ALLOWED_HOSTS']} refuses (400), "
        f"at {url.path!r}, which is not the health path answered before host validation"
    )
    # Its program is in the image.
    for name, service in app_services().items():
        if "healthcheck" not in service:
            continue
        program = healthcheck_argv(service)[0]
        packages = apt_packages(parse_dockerfile(build_of(service)[1]))
        assert program in PIP_PROGRAMS | packages, f"{name}: {program} is not installed in its image"
    for name in ("worker-cpu", "worker-gpu"):
        argv = healthcheck_argv(s[name])
        assert argv[:5] == ["celery", "-A", "config", "inspect", "ping"], argv
        assert "celery@$HOSTNAME" in argv, f"{name} pings another node than its own: {argv}"


def test_workers_cover_every_queue_and_one_beat_runs():
    from django.conf import settings

    routed = {settings.CELERY_TASK_DEFAULT_QUEUE} | {r["queue"] for r in settings.CELERY_TASK_ROUTES.values()}
    assert routed >= {"default", "gpu"}
    listened = {}
    for name, service in app_services().items():
        command = service["command"]
        if command[:4] == ["celery", "-A", "config", "worker"]:
            listened[name] = set(option(command, "-Q", "--queues").split(","))
    assert set().union(*listened.values()) >= routed, f"queues nobody listens on: {routed - set().union(*listened.values())}"
    assert listened["worker-cpu"] == {"default"}
    assert listened["worker-gpu"] == {"gpu"}
    devices = services()["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    beats = [n for n, s in app_services().items() if s["command"][:4] == ["celery", "-A", "config", "beat"]]
    assert beats == ["beat"]


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed: `docker compose config -q` not run (the file is parsed above)")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("docker has no compose plugin: `docker compose config -q` not run (the file is parsed above)")
    result = subprocess.run(
        [docker, "compose", "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "config", "-q"],
        env={**os.environ, **DOTENV}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# --- Dockerfiles and .dockerignore ----------------------------------------------------------------------------------


@dataclass
class Instruction:
    command: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest, continuation lines joined
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with `\\` continuations joined; comments (and parser directives) left out."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        command, _, value = (pending + line).partition(" ")
        instructions.append(Instruction(command.upper(), value.strip(), start))
        pending = ""
    assert not pending, f"{path.name}: the file ends in a line continuation"
    return instructions


def assignments(value: str) -> dict[str, str]:
    """`ENV A=1 B="2 3"` (or the old `ENV A 1`) as a dict."""
    tokens = shlex.split(value)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for instruction in instructions:
        if instruction.command == "FROM":
            env = {}
        elif instruction.command == "ENV":
            env.update(assignments(instruction.value))
    return env


def shell_commands(run: str) -> list[str]:
    """A RUN's simple commands (split at &&, ||, ; and |)."""
    return [part.strip() for part in re.split(r"&&|\|\||;|\|", run) if part.strip()]


def apt_packages(instructions: list[Instruction]) -> set[str]:
    packages = set()
    for instruction in instructions:
        if instruction.command == "RUN":
            for command in shell_commands(instruction.value):
                if re.match(r"apt-get\s+install\b", command):
                    packages |= {t for t in command.split()[2:] if not t.startswith("-")}
    return packages


def base_image(instructions: list[Instruction]) -> str:
    froms = [i.value.split()[0] for i in instructions if i.command == "FROM"]
    assert froms, "no FROM"
    return froms[-1]


def copy_sources(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    copies = []
    for instruction in instructions:
        if instruction.command in ("COPY", "ADD"):
            tokens = instruction.value
            if tokens.startswith("["):
                tokens = json.loads(tokens)
            else:
                tokens = [t for t in shlex.split(tokens) if not t.startswith("--")]
            copies.append((tokens[:-1], tokens[-1]))
    return copies


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as Docker reads it: patterns relative to the context root, `**` any number of folders, `!`
    an exception; the last rule that matches a path or one of its parent folders decides."""
    path = ROOT / ".dockerignore"
    assert path.is_file(), "no .dockerignore: the build context sends .git, .venv, var/ and .env to the builder"
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def sent_to_the_build(relative: str, rules=None) -> bool:
    rules = dockerignore_rules() if rules is None else rules
    parts = relative.strip("/").split("/")
    excluded = False
    for negated, regex in rules:
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return not excluded


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(ROOT / request.param)


def test_base_image_is_pinned(dockerfile):
    name, instructions = dockerfile
    for instruction in instructions:
        if instruction.command == "FROM":
            image = instruction.value.split()[0]
            assert "$" not in image, f"{name}:{instruction.line}: FROM {image} depends on a build argument"
            tag = image.split("@")[0].rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag not in ("", "latest"), f"{name}:{instruction.line}: FROM {image} needs a version tag"


def test_the_python_the_image_runs_is_the_one_its_base_has_and_pyproject_requires(dockerfile):
    name, instructions = dockerfile
    image = base_image(instructions)
    repository, _, tag = image.split("@")[0].rpartition(":")
    repository = repository.rsplit("/", 1)[-1]
    distribution = f"ubuntu{tag}" if repository == "ubuntu" else next((d for d in DISTRIBUTION_PYTHON if d in tag), None)
    # python:X.Y-... runs the Python it built, X.Y; any other base, its distribution's python3.
    python = re.match(r"\d+\.\d+", tag).group(0) if repository == "python" else DISTRIBUTION_PYTHON.get(distribution)
    for package in apt_packages(instructions):
        if version := re.fullmatch(r"python(\d+\.\d+)(?:-\w+)?", package):
            assert distribution in DISTRIBUTION_PYTHON, f"{name}: which distribution is {image}? (DISTRIBUTION_PYTHON)"
            shipped = DISTRIBUTION_PYTHON[distribution]
            assert version.group(1) == shipped, (
                f"{name} installs {package}, but {image} is {distribution}, whose apt has Python {shipped} only")
            python = version.group(1)
    assert python, f"{name}: which Python does {image} run? (DISTRIBUTION_PYTHON)"
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert f"{python}.0" in requires, f"{name} runs Python {python}; pyproject.toml requires {requires}"


def test_apt_and_pip_leave_no_caches_and_install_nothing_unasked(dockerfile):
    name, instructions = dockerfile
    for instruction in instructions:
        if instruction.command != "RUN":
            continue
        where = f"{name}:{instruction.line}"
        commands = shell_commands(instruction.value)
        assert not any(re.match(r"apt\s", c) for c in commands), f"{where}: apt-get, not apt, in a Dockerfile"
        installs = [c for c in commands if re.match(r"apt-get\s+install\b", c)]
        if installs:
            assert any(re.match(r"apt-get\s+update\b", c) for c in commands), f"{where}: update in the same RUN"
            assert any(c.startswith("rm -rf /var/lib/apt/lists") for c in commands), f"{where}: apt lists not removed"
        for command in installs:
            assert re.search(r"\s(-y|--yes|--assume-yes)\b", command), f"{where}: apt-get install without -y"
            assert "--no-install-recommends" in command, f"{where}: apt-get install without --no-install-recommends"
        for command in commands:
            if re.search(r"\bpip3?\s+install\b", command):
                assert "--no-cache-dir" in command, f"{where}: pip install without --no-cache-dir"


def test_torch_is_the_release_pyproject_pins_cpu_build_for_cpu_images_and_cuda_for_gpu(dockerfile):
    name, instructions = dockerfile
    pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["ml"] if d.startswith("torch=="))
    installs = [(i, c) for i in instructions if i.command == "RUN" for c in shell_commands(i.value)
                if re.search(r"\bpip3?\s+install\b.*\btorch\b", c)]  # fmt: skip
    assert len(installs) == 1, f"{name}: torch is installed once, before the project: {installs}"
    instruction, command = installs[0]
    assert pin in command.split(), f"{name} installs {command!r}; pyproject.toml pins {pin}"
    if name == "Dockerfile.gpu":
        assert "/whl/cpu" not in command, f"{name} installs the CPU build of torch"
        assert re.search(r"assert torch\.version\.cuda\b", instruction.value), f"{name}: the build checks for CUDA"
    else:
        assert "/whl/cpu" in command, f"{name}: the CPU image takes torch's CPU build (no CUDA libraries)"
        assert "torch.version.cuda is None" in instruction.value, f"{name}: the build checks for the CPU build"


def test_copy_sources_exist_and_dockerignore_lets_them_through(dockerfile):
    name, instructions = dockerfile
    rules, tracked = dockerignore_rules(), tracked_files()
    copied = set()
    for sources, _destination in copy_sources(instructions):
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file in the context"
            assert source not in (".", "./"), f"{name}: COPY . copies whatever lies in the folder; name what the image runs"
            assert sent_to_the_build(source, rules), f"{name}: COPY {source}, which .dockerignore keeps out"
            inside = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")]
            kept_out = [f for f in inside if not sent_to_the_build(f, rules)]
            assert not kept_out, f"{name}: .dockerignore keeps out files of COPY {source}: {kept_out[:5]}"
            copied.add(source.rstrip("/"))
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", "manage.py", "gunicorn.conf.py"}
    assert needed <= copied, f"{name} does not copy {sorted(needed - copied)}"


def test_dockerignore_keeps_local_state_and_secrets_out():
    rules = dockerignore_rules()
    for path in (".git/HEAD", ".venv/bin/python", "var/db.sqlite3", "var/artifacts/x.pt", ".env", "staticfiles/a.css",
                 "annotation/__pycache__/models.cpython-311.pyc", "rlhf_platform.egg-info/PKG-INFO"):  # fmt: skip
        assert not sent_to_the_build(path, rules), f"{path} would be sent to the build"
    for path in ("manage.py", "annotation/models/__init__.py", "frontend/static/frontend/app.css"):
        assert sent_to_the_build(path, rules), path


def test_images_run_as_a_user_with_exec_form_commands_and_no_baked_secret(dockerfile):
    name, instructions = dockerfile
    users = [i.value for i in instructions if i.command == "USER"]
    assert users, f"{name} runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"
    for instruction in instructions:
        assert instruction.command != "ADD", f"{name}:{instruction.line}: COPY, not ADD"
        assert instruction.command != "MAINTAINER", f"{name}:{instruction.line}: MAINTAINER is deprecated"
        if instruction.command == "WORKDIR":
            assert instruction.value.startswith("/"), f"{name}:{instruction.line}: WORKDIR is relative"
        if instruction.command in ("CMD", "ENTRYPOINT"):
            assert instruction.value.startswith("["), f"{name}:{instruction.line}: exec form (JSON), not shell form"
        if instruction.command in ("ENV", "ARG"):
            secrets = [k for k in assignments(instruction.value) if re.search(r"SECRET|PASSWORD|TOKEN", k)]
            assert not secrets, f"{name}:{instruction.line}: {secrets} baked into the image"
    assert image_env(instructions).get("DJANGO_SETTINGS_MODULE") == PRODUCTION, name


def test_collectstatic_runs_under_the_production_settings_in_the_web_image():
    web_dockerfile = build_of(services()["web"])[1]
    instructions = parse_dockerfile(web_dockerfile)
    env, runs = {}, []
    for instruction in instructions:
        if instruction.command == "ENV":
            env.update(assignments(instruction.value))
        if instruction.command == "RUN" and "collectstatic" in instruction.value:
            inline = {}
            for token in shlex.split(instruction.value):
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
                    break
                inline.update([token.split("=", 1)])
            runs.append({**env, **inline})
    assert len(runs) == 1, f"{web_dockerfile.name} runs collectstatic once: {len(runs)}"
    assert runs[0].get("DJANGO_SETTINGS_MODULE") == PRODUCTION, "collectstatic under the development settings"


# --- The image replayed: static files where production serves them --------------------------------------------------


def to_container(path: str, root: Path) -> str:
    """A path of the replayed image as the container sees it."""
    return "/" + str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path


def from_container(value: str, root: Path) -> str:
    """An absolute container path (VAR_DIR=/var/lib/rlhf) under the folder that stands for the container's `/`."""
    return str(root / value.lstrip("/")) if value.startswith("/") and not value.startswith("//") else value


def process_env(root: Path, env: dict[str, str]) -> dict[str, str]:
    """A container's environment: nothing of this shell's but PATH (the venv stands in for the image's Python)."""
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(root / "home" / "rlhf"),
        "LANG": "C.UTF-8",
        **{key: from_container(value, root) for key, value in env.items()},
    }


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """The web image's build replayed under a folder that stands for the container's `/`: its COPY steps from the
    context through .dockerignore, then its RUN steps that run the project (`manage.py ...`) with the image's
    environment at that step; pip and apt steps are stood in for by this venv."""
    root = tmp_path_factory.mktemp("image")
    instructions = parse_dockerfile(build_of(services()["web"])[1])
    rules, workdir, env = dockerignore_rules(), root, {}
    for instruction in instructions:
        if instruction.command == "WORKDIR":
            workdir = Path(from_container(instruction.value, root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.command == "ENV":
            env.update(assignments(instruction.value))
        elif instruction.command == "COPY":
            [(sources, destination)] = copy_sources([instruction])
            target = workdir / destination
            for source in sources:
                path = ROOT / source
                files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if not sent_to_the_build(relative, rules):
                        continue
                    if path.is_file():
                        out = target / file.name if destination.endswith("/") or len(sources) > 1 else target
                    else:
                        out = target / file.relative_to(path)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)
        elif instruction.command == "RUN" and "manage.py" in instruction.value:
            result = subprocess.run(["/bin/sh", "-c", instruction.value], cwd=workdir, env=process_env(root, env),
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
            assert result.returncode == 0, f"RUN {instruction.value}\n{result.stdout}\n{result.stderr}"
    return root


SETTINGS_DUMP = """
import json, django
django.setup()
from django.conf import settings
print(json.dumps({"BASE_DIR": str(settings.BASE_DIR), "STATIC_ROOT": str(settings.STATIC_ROOT),
                  "ARTIFACTS_DIR": str(settings.ARTIFACTS_DIR), "ALLOWED_HOSTS": settings.ALLOWED_HOSTS,
                  "MIDDLEWARE": settings.MIDDLEWARE, "DEBUG": settings.DEBUG,
                  "STATICFILES": settings.STORAGES["staticfiles"]["BACKEND"]}))
"""


def container_env(name: str) -> dict[str, str]:
    """What a compose service's container sees: its image's ENV, then its env_file (.env: DOTENV), then its
    `environment`."""
    service = services()[name]
    files = service.get("env_file") or []
    files = [files] if isinstance(files, str) else files
    dotenv = DOTENV if any((f if isinstance(f, str) else f["path"]) == ".env" for f in files) else {}
    return {**image_env(parse_dockerfile(build_of(service)[1])), **dotenv, **environment(service)}


@pytest.fixture(scope="module")
def settings_under(image_root):
    """The settings a compose service's process loads, read in the replayed image (paths as the container's)."""
    cache = {}

    def read(name: str) -> dict:
        if name not in cache:
            result = subprocess.run(
                [sys.executable, "-c", SETTINGS_DUMP], cwd=image_root / "app",
                env=process_env(image_root, container_env(name)), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            values = json.loads(result.stdout.strip().splitlines()[-1])
            cache[name] = {k: to_container(v, image_root) if isinstance(v, str) else v for k, v in values.items()}
        return cache[name]

    return read


def test_static_root_of_every_service_is_where_the_image_build_collected(image_root, settings_under):
    manifests = [to_container(str(p.parent), image_root) for p in image_root.rglob("staticfiles.json")]
    assert len(manifests) == 1, f"the build's collectstatic wrote manifests at {manifests}"
    for name in app_services():
        loaded = settings_under(name)
        assert loaded["BASE_DIR"] == "/app", f"{name} did not load the replayed image's code: {loaded['BASE_DIR']}"
        assert loaded["STATIC_ROOT"] == manifests[0], (
            f"{name} serves static files from {loaded['STATIC_ROOT']}; the build collected them into {manifests[0]}")
        assert loaded["STATICFILES"].startswith("whitenoise."), loaded["STATICFILES"]
        assert "whitenoise.middleware.WhiteNoiseMiddleware" in loaded["MIDDLEWARE"]
        assert loaded["DEBUG"] is False
        assert loaded["ARTIFACTS_DIR"] == environment(services()[name])["ARTIFACTS_DIR"]


# --- gunicorn with the production settings, every page ---------------------------------------------------------------


PASSWORD = "deploy-check-password-123"
# Every page of frontend/urls.py by name: what a signed-in admin gets (405: the page takes POST only).
FRONTEND_PAGES = {
    "home": 302, "login": 200, "logout": 405, "annotate": 200, "annotate-next": 405, "annotate-submit": 405,
    "annotate-skip": 405, "prompt-write": 200, "guidelines": 200, "guidelines-domain": 200, "review": 200,
    "review-task": 200, "dashboard": 200, "dashboard-runs": 200, "run-cancel": 405, "run-start": 405,
    "annotate-history": 200, "annotate-undo": 405, "work": 200, "batch-close": 405, "rate": 200, "rate-submit": 405, "campaigns": 200, "campaign": 200, "campaign-close": 405,
}  # fmt: skip
STATIC_REFERENCE = re.compile(r"""(?:src|href)=["'](/static/[^"'?#]+)""")
CSS_URL = re.compile(r"""url\(\s*["']?([^"')]+)["']?\s*\)""")


def database_url() -> str:
    s = connection.settings_dict
    if connection.vendor == "postgresql":
        return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    return f"sqlite:///{s['NAME']}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """A client that keeps cookies and comes, like production traffic, through a TLS-terminating proxy."""

    def __init__(self, port: int):
        self.port, self.cookies, self.seen = port, {}, []

    def request(self, method: str, path: str, *, host: str = HOST, https: bool = True, form=None, headers=None):
        head = {"Host": host, **({"X-Forwarded-Proto": "https"} if https else {}), **(headers or {})}
        if self.cookies:
            head["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            head["Content-Type"] = "application/x-www-form-urlencoded"
        if method == "POST":
            head.setdefault("Origin", f"https://{host}")
            head.setdefault("Referer", f"https://{host}{path}")
            if "csrftoken" in self.cookies:
                head.setdefault("X-CSRFToken", self.cookies["csrftoken"])
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=head)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        for cookie in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = cookie.partition("=")
            value = rest.split(";")[0]
            if value and "max-age=0" not in cookie.lower():
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        self.seen.append((method, path, response.status))
        assert response.status < 500, f"{method} {path}: {response.status}\n{data[:2000].decode(errors='replace')}"
        return response.status, response.headers, data


@pytest.fixture
def gunicorn_web(image_root, tmp_path):
    """gunicorn as the compose web service runs it (its command, in the image's /app, where it reads
    gunicorn.conf.py), with its environment; the hosts compose names (postgres, redis) are this test's database
    and broker, the cache is the process's own."""
    command = services()["web"]["command"]
    port = free_port()
    bind = command.index("--bind") + 1
    command = [sys.executable, "-m", *command[:bind], f"127.0.0.1:{port}", *command[bind + 1:]]
    env = process_env(image_root, container_env("web"))
    env.update(DATABASE_URL=database_url(), CACHE_URL="locmemcache://")
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        env.pop(key)
        if key in os.environ:
            env[key] = os.environ[key]
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=image_root / "app", env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, log_path.read_text()
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail(f"gunicorn did not start\n{log_path.read_text()}")
    yield port, log_path
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def frontend_paths(args: dict) -> dict[str, str]:
    from frontend.urls import app_name, urlpatterns

    paths = {}
    for pattern in urlpatterns:
        assert isinstance(pattern, URLPattern), pattern
        kwargs = {name: args[name] for name in pattern.pattern.converters}
        paths[pattern.name] = reverse(f"{app_name}:{pattern.name}", kwargs=kwargs)
    return paths


@pytest.mark.django_db(transaction=True)
def test_gunicorn_serves_every_page_under_the_production_settings_as_compose_runs_it(gunicorn_web):
    from django.contrib.auth import get_user_model

    from annotation.tests.factories import BatchFactory, make_tasks

    get_user_model().objects.create_superuser("deploy-admin", password=PASSWORD)
    tasks = make_tasks(BatchFactory(name="deploy-check", overlap=1), 3)
    port, log_path = gunicorn_web
    browser = Browser(port)

    # The healthcheck as compose sends it; host validation and the HTTPS redirect everywhere else.
    url = urlsplit(next(t for t in healthcheck_argv(services()["web"]) if t.startswith("http")))
    status, _, body = browser.request("GET", url.path, host=url.netloc.replace(str(url.port), str(port)), https=False)
    assert (status, body) == (200, b"ok\n")
    assert browser.request("GET", "/login/", host="127.0.0.1", https=False)[0] == 400
    status, headers, _ = browser.request("GET", "/login/", https=False)
    assert (status, headers["Location"]) == (301, f"https://{HOST}/login/")

    # Sign in through the log-in page, with its CSRF token.
    status, _, page = browser.request("GET", "/login/")
    assert status == 200
    assets = set(STATIC_REFERENCE.findall(page.decode()))
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.decode()).group(1)
    status, headers, _ = browser.request("POST", "/login/", form={
        "username": "deploy-admin", "password": PASSWORD, "csrfmiddlewaretoken": token, "next": ""})  # fmt: skip
    assert (status, headers["Location"]) == (302, "/"), "the log-in did not go through"
    assert "sessionid" in browser.cookies

    # Every page of the frontend, then the admin (its index and every list it links to) and the API schema UI.
    from annotation.services.campaigns import campaign_create
    from annotation.tests.factories import PolicyFactory

    PolicyFactory(name="deploy-v2")
    campaign = campaign_create(name="deploy-campaign", kind="pairwise", policy="deploy-v2", baseline="SFT", prompts=[
        {"dialogue": [{"role": "user", "content": "Hi"}], "response": "Hello", "baseline_response": "Hey"}])  # fmt: skip
    paths = frontend_paths({"task_id": tasks[0].id, "domain": "safety", "run_id": 1, "campaign_id": campaign.pk,
                            "item_id": campaign.items.get().pk, "annotation_id": 1, "batch_id": 1})  # fmt: skip
    assert set(paths) == set(FRONTEND_PAGES), f"pages without an expected status here: {set(paths) ^ set(FRONTEND_PAGES)}"
    pages = {**{paths[name]: FRONTEND_PAGES[name] for name in paths}, "/admin/": 200, "/api/schema/ui/": 200,
             "/api/schema/": 200}  # fmt: skip
    status, _, admin = browser.request("GET", "/admin/")
    for link in sorted(set(re.findall(r'href="(/admin/\w+/\w+/)"', admin.decode()))):
        pages[link] = 200
    assert len(pages) > len(FRONTEND_PAGES) + 5, "the admin index links to no model"
    for path, expected in pages.items():
        status, headers, body = browser.request("GET", path)
        assert status == expected, f"GET {path}: {status}, expected {expected}"
        if status == 200 and headers.get_content_type() == "text/html":
            assets |= set(STATIC_REFERENCE.findall(body.decode()))
    # A write through the page's JSON call: CSRF and the secure cookies hold behind the proxy.
    status, _, body = browser.request("POST", paths["annotate-next"], headers={"Content-Type": "application/json"})
    assert status == 200
    assert json.loads(body)["task"]["task_id"] in {t.id for t in tasks}

    # The static files the pages name: collected with hashed names (the manifest), served by whitenoise.
    assert any(re.fullmatch(r"/static/frontend/app\.[0-9a-f]{12}\.css", a) for a in assets), sorted(assets)
    assert any("swagger-ui" in a for a in assets), sorted(assets)
    fetched = set()
    pending = sorted(assets)
    while pending:
        asset = pending.pop()
        if asset in fetched:
            continue
        fetched.add(asset)
        status, headers, body = browser.request("GET", asset)
        assert status == 200, f"GET {asset}: {status}"
        assert body, f"GET {asset}: empty"
        if asset.endswith(".css"):
            for reference in CSS_URL.findall(body.decode()):
                if not reference.startswith(("data:", "#", "http:", "https:")):
                    pending.append(urljoin(asset, reference.split("#")[0].split("?")[0]))

    # Signing out ends the session.
    status, _, _ = browser.request("POST", paths["logout"])
    assert status in (200, 302)  # Django's "logged out" page, or a redirect
    assert "sessionid" not in browser.cookies
    status, headers, _ = browser.request("GET", paths["annotate"])
    assert (status, headers["Location"]) == (302, f"/login/?next={paths['annotate']}")
    log = log_path.read_text()  # the one traceback expected is the refused host's (DisallowedHost, logged)
    assert '" 500 ' not in log, log[-4000:]
    assert "Internal Server Error" not in log, log[-4000:]
