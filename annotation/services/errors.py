"""Domain errors a user can cause; the API maps each to a 4xx in one handler (annotation.api.errors)."""


class AnnotationError(Exception):
    """Base class: carries an HTTP status, a stable code and a message that says what to fix."""

    status_code = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(AnnotationError):
    code = "invalid"


class NotFound(AnnotationError):
    status_code = 404
    code = "not_found"


class PermissionDenied(AnnotationError):
    status_code = 403
    code = "permission_denied"


class Conflict(AnnotationError):
    status_code = 409
    code = "conflict"


class LeaseExpired(Conflict):
    code = "lease_expired"


class BatchClosed(Conflict):
    code = "batch_closed"
