"""Refuse what no view could take before a view runs: a body over the upload limit, a NUL in the query string.

Django raises RequestDataTooBig only when a view reads the body, and answers it with an HTML 400 while the
unread body is still on the socket: a keep-alive client then sends its next request into the leftover
bytes. Here the declared length is checked first, the answer is JSON (413, with the limit) on the API and
the annotation page's calls, and it says `Connection: close`: Django's development server closes on it,
and gunicorn (which drops hop-by-hop headers from the application) is told by `gunicorn.conf.py`, whose
`pre_request` hook applies `body_over_limit` to the same header.
"""

from django.conf import settings
from django.http import HttpResponse, JsonResponse

from annotation.validation import text_problem

# Paths whose clients read JSON errors: the REST API, and the annotation page's own JSON calls.
JSON_PREFIXES = ("/api/", "/annotate/")


def upload_limit() -> int | None:
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def body_over_limit(content_length: str | None) -> bool:
    """Whether a declared Content-Length exceeds DATA_UPLOAD_MAX_MEMORY_SIZE (None: no limit)."""
    limit = upload_limit()
    if limit is None or not content_length:
        return False
    try:
        return int(content_length) > limit
    except ValueError:
        return False  # the server refuses a malformed length before Django sees it


def _refusal(request, status: int, code: str, message: str, field: str | None = None, **extra) -> HttpResponse:
    if request.path.startswith("/api/"):
        body = {"code": code, "detail": message, **({"field": field} if field else {}), **extra}
        return JsonResponse(body, status=status)
    if request.path.startswith(JSON_PREFIXES):
        return JsonResponse({"error": {"code": code, "message": message, "field": field}, **extra}, status=status)
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


class RequestLimitsMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if body_over_limit(request.META.get("CONTENT_LENGTH")):
            limit = upload_limit()
            response = _refusal(
                request, 413, "too_large", f"the request body is larger than the limit of {limit} bytes", limit=limit
            )
            # The body stays unread: this connection cannot carry another request.
            response["Connection"] = "close"
            response["Content-Length"] = str(len(response.content))  # answered before CommonMiddleware sets it
            return response
        for key, values in request.GET.lists():
            for text in (key, *values):
                if problem := text_problem(text):
                    name = key.replace("\x00", "\\u0000")
                    return _refusal(request, 400, "invalid", f"query parameter {name} {problem}", field=name)
        return self.get_response(request)
