"""A bounded schemathesis run against the OpenAPI schema: no input may produce a 5xx, and responses match it."""

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from annotation.models import Role
from annotation.tests.factories import BatchFactory, annotator, make_tasks
from config.wsgi import application

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)

# Strings no JSON field may store (annotation.validation): a NUL, one far over any limit. (Lone surrogates:
# schemathesis writes bodies as UTF-8, which cannot carry them; test_web_json_fuzz.py sends them escaped.)
POISON = ["x\u0000y", "\u0000", "x" * 300_000]


def _poisoned(body, choice: int, poison: str):
    """`body` with its `choice`-th string (a key or a value, in walk order) replaced by `poison`."""
    count = -1

    def walk(value):
        nonlocal count
        if isinstance(value, str):
            count += 1
            return poison if count == choice else value
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                count += 1
                out[poison if count == choice else key] = walk(item)
            return out
        return value

    return walk(body)


def _strings_in(body) -> int:
    if isinstance(body, str):
        return 1
    if isinstance(body, list):
        return sum(_strings_in(v) for v in body)
    if isinstance(body, dict):
        return sum(1 + _strings_in(v) for v in body.values())
    return 0


@schema.hook
def flatmap_body(context, body):
    """Half the bodies as generated, half with one key or string swapped for a poisoned one."""
    n = _strings_in(body)
    if not n:
        return st.just(body)
    poisoned = st.builds(_poisoned, st.just(body), st.integers(0, n - 1), st.sampled_from(POISON))
    return st.one_of(st.just(body), poisoned)


@pytest.fixture(autouse=True)
def _keep_test_connection_open():
    """Like Django's test client: the WSGI handler must not close the test transaction's connection."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def token(db):
    """A researcher (allowed nearly everywhere) in a platform holding a little data."""
    batch = BatchFactory(name="fuzz", overlap=2)
    make_tasks(batch, 3)
    make_tasks(batch, 2, domain="safety")
    user = annotator("fuzzer", role=Role.RESEARCHER, safety=True)
    return Token.objects.create(user=user).key


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_gives_a_server_error(case, token):
    # No 5xx, and every documented response body matches the schema (the claim payload is built by hand).
    case.call_and_validate(
        headers={"Authorization": f"Token {token}"}, checks=[not_a_server_error, response_schema_conformance]
    )
