from rest_framework.permissions import BasePermission

from annotation.models import AnnotatorProfile, Role


def role_of(user) -> str | None:
    if not user or not user.is_authenticated:
        return None
    if user.is_superuser:
        return Role.ADMIN
    profile = AnnotatorProfile.objects.filter(user=user).only("role").first()
    return profile.role if profile else Role.ANNOTATOR


class HasRole(BasePermission):
    """Allow users whose profile role is in `roles` (superusers count as admins)."""

    roles: tuple[str, ...] = ()
    message = "your role does not allow this"

    def has_permission(self, request, view) -> bool:
        return role_of(request.user) in self.roles


class IsResearcher(HasRole):
    roles = (Role.RESEARCHER, Role.ADMIN)
    message = "only researchers and admins may do this"


class IsReviewer(HasRole):
    roles = (Role.REVIEWER, Role.RESEARCHER, Role.ADMIN)
    message = "only reviewers, researchers and admins may do this"


class ReadReviewerWriteResearcher(BasePermission):
    """Reviewers, researchers and admins may read; researchers and admins may write. Annotators neither: batch
    figures and the policies behind a comparison would unblind them (which tasks are gold, who chose what)."""

    def has_permission(self, request, view) -> bool:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return role_of(request.user) in IsReviewer.roles
        return role_of(request.user) in IsResearcher.roles
