"""`GET /healthz`: "ok" from the web process, answered before host validation and the HTTPS redirect.

A container's healthcheck asks over plain HTTP on 127.0.0.1 (docker-compose.yml), a host that ALLOWED_HOSTS rightly
refuses on every other path. The answer is a fixed text: it builds no URL from the Host header and reads nothing,
so nothing that host validation protects is skipped. It tells that gunicorn serves requests (no database query:
the database has a healthcheck of its own).
"""

from django.http import HttpResponse

HEALTH_PATH = "/healthz"


class HealthCheckMiddleware:
    """First in the production settings' MIDDLEWARE; every other request goes on unchanged."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path_info == HEALTH_PATH and request.method in ("GET", "HEAD"):
            response = HttpResponse(b"ok\n", content_type="text/plain")
            response["Cache-Control"] = "no-store"
            return response
        return self.get_response(request)
