"""One place that turns domain errors into 4xx responses with a message that says what to fix."""

import logging

from django.db import IntegrityError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from annotation.services.errors import AnnotationError

logger = logging.getLogger(__name__)


def exception_handler(exc, context):
    if isinstance(exc, AnnotationError):
        body = {"code": exc.code, "detail": exc.message}
        if exc.field:
            body["field"] = exc.field
        return Response(body, status=exc.status_code)
    if isinstance(exc, IntegrityError):
        # A constraint caught a race the services did not foresee; the transaction was rolled back.
        logger.warning("integrity error mapped to 409: %s", exc)
        return Response(
            {"code": "conflict", "detail": "the request conflicts with the current state; reload and retry"},
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)
