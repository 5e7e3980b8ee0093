"""A bounded schemathesis run against the OpenAPI schema: no input may produce a 5xx, and responses match it."""

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from annotation.models import Role
from annotation.tests.factories import BatchFactory, annotator, make_tasks
from config.wsgi import application

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


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
