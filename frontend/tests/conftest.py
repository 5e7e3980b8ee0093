import pytest

from annotation.models import Role
from annotation.tests.factories import BatchFactory, annotator, make_tasks


@pytest.fixture(autouse=True)
def _fresh_throttle_cache():
    """Rate-limit counters live in the cache; a reused user id must not inherit another test's requests."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def batch(db):
    return BatchFactory(name="week-1", overlap=2)


@pytest.fixture
def tasks(batch):
    return make_tasks(batch, 3)


@pytest.fixture
def annotator_client(client, db):
    user = annotator("ann1")
    client.force_login(user)
    client.user = user
    return client


def client_for(client, username: str, role: str, **kwargs):
    user = annotator(username, role=role, **kwargs)
    client.force_login(user)
    client.user = user
    return client


@pytest.fixture
def researcher_client(client, db):
    return client_for(client, "lead", Role.RESEARCHER)


@pytest.fixture
def reviewer_client(client, db):
    return client_for(client, "rev", Role.REVIEWER)
