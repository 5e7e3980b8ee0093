"""Who may open which page: annotators their own work, reviewers the review queue, researchers the dashboard."""

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

from annotation.api.permissions import role_of
from annotation.models import Role

REVIEW_ROLES = (Role.REVIEWER, Role.RESEARCHER, Role.ADMIN)
DASHBOARD_ROLES = (Role.RESEARCHER, Role.ADMIN)


def role_required(*roles: str):
    """Sign-in required; with `roles`, the user's role must be one of them (403 otherwise)."""

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            request.role = role_of(request.user)
            if roles and request.role not in roles:
                raise PermissionDenied("your role does not allow this page")
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
