"""Rate limits that hold under concurrency: one atomic counter per key and fixed time window in the cache.

DRF's own throttles keep a list of request times and write it back after reading it, so parallel requests of
one user all read the same list and all pass (8 threads x 130 claims at 120/min let 124-130 through). Here a
request is counted with `cache.add` (create the window's counter if it is missing) and `cache.incr` (atomic in
Redis, and under the lock of the local-memory cache), so exactly `limit` requests pass in each window, whatever
the number of threads or processes sharing the cache. A fixed window lets a client spend one window's budget at
its end and the next one's at the start of the next: at most twice the rate over the seam, never more.

Log-in attempts are counted the same way, per user name and per client address (`login_attempt_begin`).
"""

import hashlib
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle


def _window(key: str, window_s: int, now: float) -> tuple[str, float]:
    """The cache key of `key`'s counter in the window holding `now`, and the seconds left in that window."""
    window = int(now // window_s)
    return f"rate:{key}:{window_s}:{window}", (window + 1) * window_s - now


def _count(window_key: str, window_s: int) -> int:
    """Add one to a window's counter atomically; returns the count including this one."""
    # Counters live for two windows: one is never dropped while its window is current, so `incr` can only
    # miss it when the cache evicted it.
    cache.add(window_key, 0, timeout=2 * window_s)
    try:
        return cache.incr(window_key)
    except ValueError:  # evicted between add and incr: start the window's counter again
        cache.add(window_key, 0, timeout=2 * window_s)
        return cache.incr(window_key)


def window_hit(key: str, *, limit: int, window_s: int, now: float | None = None) -> float | None:
    """Count one request against `key` in the current window of `window_s` seconds.

    Returns None while the window holds at most `limit` requests (this one included), else the seconds until
    the window ends.
    """
    window_key, wait = _window(key, window_s, time.time() if now is None else now)
    return None if _count(window_key, window_s) <= limit else wait


def client_address(request) -> str:
    """The client's address: REMOTE_ADDR, or the address the trusted proxies in front saw (NUM_PROXIES).

    DRF's own `get_ident` believes any X-Forwarded-For when NUM_PROXIES is unset, which lets a client pick a
    new identity per request; here the header is read only when NUM_PROXIES says how many proxies set it.
    """
    remote_addr = request.META.get("REMOTE_ADDR", "")
    num_proxies = api_settings.NUM_PROXIES or 0
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if num_proxies > 0 and forwarded:
        addresses = [a.strip() for a in forwarded.split(",") if a.strip()]
        if addresses:
            return addresses[-min(num_proxies, len(addresses))]
    return remote_addr


class ExactScopedRateThrottle(ScopedRateThrottle):
    """DRF's ScopedRateThrottle (same `throttle_scope`, same rates setting) counted exactly under concurrency."""

    def allow_request(self, request, view) -> bool:
        self.scope = getattr(view, self.scope_attr, None)
        if not self.scope:
            return True
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        if self.num_requests is None:
            return True
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        self.wait_s = window_hit(self.key, limit=self.num_requests, window_s=self.duration, now=self.timer())
        return self.wait_s is None

    def get_ident(self, request) -> str:
        return client_address(request)

    def wait(self) -> float | None:
        return getattr(self, "wait_s", None)


@dataclass(frozen=True)
class LoginAttempt:
    """One log-in attempt, counted before the password is checked. `refused_for`: seconds to wait, or None."""

    window_keys: tuple[str, ...]
    refused_for: int | None


def login_attempt_begin(request, username: str) -> LoginAttempt:
    """Count a log-in attempt against the user name and the client address, before checking the password.

    Counting first keeps the limit exact under parallel guesses (checking, then counting failures later, lets
    every request of a burst pass the check). Past `LOGIN_FAILURES_PER_USER` or `LOGIN_FAILURES_PER_ADDRESS`
    attempts in the window the attempt is refused, the right password included: otherwise the answer would
    tell a guesser which password was right. A successful log-in gives its count back
    (`login_attempt_succeeded`), so only failures use up the budget.
    """
    window_s = settings.LOGIN_FAILURE_WINDOW_SECONDS
    # Hashed: a user name may be long or hold characters a cache key must not (memcached).
    name = hashlib.sha256(username.strip().lower().encode("utf-8", "replace")).hexdigest()[:32]
    now = time.time()
    refused_for = None
    window_keys = []
    for key, limit in (
        (f"login-user:{name}", settings.LOGIN_FAILURES_PER_USER),
        (f"login-addr:{client_address(request)}", settings.LOGIN_FAILURES_PER_ADDRESS),
    ):
        window_key, wait = _window(key, window_s, now)
        window_keys.append(window_key)
        if _count(window_key, window_s) > limit:
            refused_for = max(refused_for or 0, math.ceil(wait))
    return LoginAttempt(tuple(window_keys), refused_for)


def login_attempt_succeeded(attempt: LoginAttempt) -> None:
    """A right password: give the attempt's count back, so that signing in does not use up the budget."""
    for window_key in attempt.window_keys:
        try:
            cache.decr(window_key)
        except ValueError:  # the window's counter is gone (expired or evicted): nothing to give back
            pass
