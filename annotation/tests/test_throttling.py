"""Rate limits that hold under concurrency (claim, submit) and log-in limits per user name and address."""

import os
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from django.core.cache import cache
from django.core.cache.backends.locmem import LocMemCache
from django.test import override_settings
from rest_framework.test import APIClient
from rest_framework.throttling import ScopedRateThrottle

from annotation.throttling import ExactScopedRateThrottle, login_attempt_begin

from .factories import BatchFactory, annotator, make_tasks

PASSWORD = "pw-for-tests-123"


def _redis_cache_url() -> str | None:
    """The Redis the tests' broker runs on (CI), with a database number of its own for the cache."""
    broker = os.environ.get("CELERY_BROKER_URL", "")
    if not broker.startswith("redis://"):
        return None
    parts = urlsplit(broker)
    return f"redis://{parts.netloc}/{(int(parts.path.strip('/') or 0) + 3) % 16}"


class LatentLocMemCache(LocMemCache):
    """The local-memory cache with a network cache's round trip before each call (each call stays atomic), so
    that a read-then-write throttle shows the race it has on Redis."""

    def _round_trip(self):
        time.sleep(0.0002)

    def get(self, *args, **kwargs):
        self._round_trip()
        return super().get(*args, **kwargs)

    def set(self, *args, **kwargs):
        self._round_trip()
        return super().set(*args, **kwargs)

    def add(self, *args, **kwargs):
        self._round_trip()
        return super().add(*args, **kwargs)

    def incr(self, *args, **kwargs):
        self._round_trip()
        return super().incr(*args, **kwargs)


def _caches():
    yield pytest.param({"BACKEND": f"{__name__}.LatentLocMemCache"}, id="locmem")
    url = _redis_cache_url()
    marks = () if url else pytest.mark.skip(reason="CELERY_BROKER_URL is not Redis: no Redis to test against")
    yield pytest.param(
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url or ""}, id="redis", marks=marks
    )


def _claims_allowed(throttle_class, *, threads: int, per_thread: int) -> int:
    """`threads` x `per_thread` claims of one user at 120/min in one instant; how many the throttle lets by."""
    request = SimpleNamespace(user=SimpleNamespace(pk=7, is_authenticated=True), META={"REMOTE_ADDR": "10.0.0.1"})
    view = SimpleNamespace(throttle_scope="claim")
    allowed = [0] * threads
    start = threading.Barrier(threads)

    def claims(i: int) -> None:
        start.wait()
        for _ in range(per_thread):
            throttle = throttle_class()
            throttle.timer = lambda: 1_000_020.0  # one instant, well inside one minute's window
            allowed[i] += throttle.allow_request(request, view)

    workers = [threading.Thread(target=claims, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(allowed)


@pytest.mark.parametrize("cache_config", list(_caches()))
def test_claim_throttle_is_exact_under_parallel_requests(monkeypatch, cache_config):
    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "claim", "120/min")
    with override_settings(CACHES={"default": cache_config}):
        cache.clear()
        assert _claims_allowed(ExactScopedRateThrottle, threads=8, per_thread=130) == 120
        cache.clear()
        assert _claims_allowed(ExactScopedRateThrottle, threads=16, per_thread=40) == 120
        cache.clear()


def test_the_next_window_opens_again(monkeypatch):
    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "claim", "2/min")
    request = SimpleNamespace(user=SimpleNamespace(pk=8, is_authenticated=True), META={})
    view = SimpleNamespace(throttle_scope="claim")
    throttle = ExactScopedRateThrottle()
    throttle.timer = lambda: 600.0
    assert [throttle.allow_request(request, view) for _ in range(3)] == [True, True, False]
    assert throttle.wait() == pytest.approx(60.0)
    throttle.timer = lambda: 660.0
    assert throttle.allow_request(request, view)


@pytest.mark.django_db
def test_api_claims_and_the_page_share_one_exact_counter(monkeypatch, client):
    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "claim", "3/min")
    make_tasks(BatchFactory(), 2)
    user = annotator("shared-count")
    api = APIClient()
    api.force_authenticate(user)
    client.force_login(user)
    codes = [api.post("/api/v1/tasks/next/").status_code, client.post("/annotate/next/").status_code]
    codes += [api.post("/api/v1/tasks/next/").status_code, client.post("/annotate/next/").status_code]
    assert codes == [200, 200, 200, 429]


# Log-in limits ---------------------------------------------------------------------------------------------

LIMITS = {"LOGIN_FAILURES_PER_USER": 3, "LOGIN_FAILURES_PER_ADDRESS": 6, "LOGIN_FAILURE_WINDOW_SECONDS": 900}


def _token(username: str, password: str, address: str = "10.1.1.1", **extra):
    return APIClient().post(
        "/api/v1/auth/token/", {"username": username, "password": password}, REMOTE_ADDR=address, **extra
    )


@pytest.mark.django_db
@override_settings(**LIMITS)
def test_token_log_in_refuses_after_failures_even_the_right_password():
    annotator("victim")
    codes = [_token("victim", f"guess-{i}").status_code for i in range(3)]
    assert codes == [400, 400, 400]
    refused = _token("victim", "guess-4")
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    # The right password is refused too during the window, from this address and from any other.
    assert _token("victim", PASSWORD).status_code == 429
    assert _token("victim", PASSWORD, address="10.9.9.9").status_code == 429
    # Another user name from another address is not affected.
    annotator("bystander")
    assert _token("bystander", PASSWORD, address="10.9.9.9").status_code == 200


@pytest.mark.django_db
@override_settings(**LIMITS)
def test_token_log_in_is_limited_per_address_across_user_names():
    for i in range(6):
        assert _token(f"sprayed-{i}", "guess").status_code == 400
    annotator("fresh")
    assert _token("fresh", PASSWORD).status_code == 429  # a user name never tried, from the same address
    # X-Forwarded-For is not believed without NUM_PROXIES: a client cannot pick a fresh address.
    assert _token("fresh", PASSWORD, HTTP_X_FORWARDED_FOR="10.7.7.7").status_code == 429
    assert _token("fresh", PASSWORD, address="10.2.2.2").status_code == 200


@pytest.mark.django_db
@override_settings(**LIMITS)
def test_successful_log_ins_do_not_use_up_the_budget():
    annotator("regular")
    assert all(_token("regular", PASSWORD).status_code == 200 for _ in range(10))
    assert [_token("regular", "typo").status_code for _ in range(3)] == [400, 400, 400]


@override_settings(**LIMITS)
def test_parallel_guesses_are_counted_exactly():
    cache.clear()
    request = SimpleNamespace(META={"REMOTE_ADDR": "10.3.3.3"})
    allowed = []
    start = threading.Barrier(8)

    def guesses() -> None:
        start.wait()
        for _ in range(20):
            allowed.append(login_attempt_begin(request, "target").refused_for is None)

    workers = [threading.Thread(target=guesses) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sum(allowed) == 3


@pytest.mark.django_db
@override_settings(**LIMITS)
def test_session_log_in_page_refuses_after_failures(client):
    annotator("page-user")
    for i in range(3):
        response = client.post("/login/", {"username": "page-user", "password": f"guess-{i}"})
        assert response.status_code == 200
        assert b"Wrong username or password" in response.content
    refused = client.post("/login/", {"username": "page-user", "password": PASSWORD})
    assert refused.status_code == 429
    assert b"Too many failed log-ins" in refused.content
    assert "_auth_user_id" not in client.session


@pytest.mark.django_db
@override_settings(**LIMITS)
def test_admin_log_in_counts_against_the_same_limit(client):
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser("boss", password=PASSWORD)
    for i in range(3):
        client.post("/admin/login/", {"username": "boss", "password": f"guess-{i}"})
    refused = client.post("/admin/login/", {"username": "boss", "password": PASSWORD})
    assert b"Too many failed log-ins" in refused.content
    assert "_auth_user_id" not in client.session
    assert _token("boss", PASSWORD, address="10.5.5.5").status_code == 429  # one count for every entry
