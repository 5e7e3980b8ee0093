import os

import pytest
from django.db import connection


@pytest.fixture(autouse=True, scope="session")
def _ci_uses_postgresql(django_db_setup, django_db_blocker):
    """Under CI the tests must run on PostgreSQL: SQLite hides skip_locked and JSON bugs."""
    if os.environ.get("CI") and connection.vendor != "postgresql":
        pytest.fail(f"CI is set but the test database is {connection.vendor}; set DATABASE_URL to PostgreSQL")


@pytest.fixture(autouse=True)
def _fresh_throttle_cache():
    """Throttle counters live in the cache; a reused user id must not inherit another test's requests."""
    from django.core.cache import cache

    cache.clear()
