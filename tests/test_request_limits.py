"""Bodies over the upload limit: JSON 413 with the limit before any view reads them, and a connection that is
closed cleanly rather than left to take the unread bytes for the next request (config.request_limits,
gunicorn.conf.py)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from annotation.models import Annotation
from annotation.tests.factories import BatchFactory, annotator, make_tasks

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=10_000)
def test_an_api_body_over_the_limit_is_a_json_413_that_closes_the_connection(client):
    make_tasks(BatchFactory(), 1)
    user = annotator("ann")
    client.force_login(user)
    task_id = client.post("/annotate/next/", content_type="application/json").json()["task"]["task_id"]
    big = '{"choice": "a", "strength": "better", "note": "' + "x" * 20_000 + '"}'
    response = client.post(f"/api/v1/tasks/{task_id}/submit/", big, content_type="application/json")
    assert response.status_code == 413
    assert response.json() == {
        "code": "too_large",
        "detail": "the request body is larger than the limit of 10000 bytes",
        "limit": 10_000,
    }
    assert response["Connection"] == "close"
    page = client.post(f"/annotate/{task_id}/submit/", big, content_type="application/json")
    assert page.status_code == 413
    assert page.json()["error"]["code"] == "too_large"
    assert page["Connection"] == "close"
    assert not Annotation.objects.exists()
    # Under the limit nothing changes.
    ok = client.post(f"/api/v1/tasks/{task_id}/submit/", {"choice": "a", "strength": "better"},
                     content_type="application/json")  # fmt: skip
    assert ok.status_code == 201


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_response(f) -> tuple[str, dict[str, str], bytes]:
    status = f.readline().decode().strip()
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


@pytest.fixture
def gunicorn_port():
    """gunicorn (threaded workers, keep-alive on) serving the project from the repository root, where it
    reads gunicorn.conf.py as it does in the image."""
    port = _free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", "1", "--threads", "2", "--keep-alive", "5"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("gunicorn did not start")
    yield port
    server.terminate()
    server.wait(timeout=10)


def _post(sock, path: str, body: bytes) -> None:
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )


def test_gunicorn_answers_413_json_and_closes_instead_of_reading_the_body_as_the_next_request(gunicorn_port):
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    with socket.create_connection(("127.0.0.1", gunicorn_port), timeout=10) as sock:
        f = sock.makefile("rb")
        # A small request first: the connection is kept alive for the next one.
        _post(sock, "/api/v1/tasks/next/", b"{}")  # not signed in: refused without a database query
        status, headers, _ = _read_response(f)
        assert status.split()[1] in ("401", "403")
        assert headers["connection"] == "keep-alive"
        # Then a body over the limit on the same connection.
        _post(sock, "/api/v1/tasks/next/", b'{"note": "' + b"x" * (limit + 1000) + b'"}')
        status, headers, body = _read_response(f)
        assert status.split()[1] == "413"
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"  # the client knows not to send another request on it
        assert f'"limit": {limit}' in body.decode() or f'"limit":{limit}' in body.decode()
        assert f.read() == b""  # closed by the server after the answer, not reset mid-answer
    # A fresh connection is served as usual.
    with socket.create_connection(("127.0.0.1", gunicorn_port), timeout=10) as sock:
        _post(sock, "/api/v1/tasks/next/", b"{}")
        status, _, _ = _read_response(sock.makefile("rb"))
        assert status.split()[1] in ("401", "403")
