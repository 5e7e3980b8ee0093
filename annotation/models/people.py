import hashlib

from django.conf import settings
from django.db import models


def annotator_pseudonym(user_id: int) -> str:
    """A stable id for exports that does not reveal who the annotator is (salted hash of the user id)."""
    digest = hashlib.sha256(f"{settings.ANNOTATOR_PSEUDONYM_SALT}:{user_id}".encode()).hexdigest()
    return f"ann-{digest[:12]}"


class Role(models.TextChoices):
    ANNOTATOR = "annotator"
    REVIEWER = "reviewer"
    RESEARCHER = "researcher"
    ADMIN = "admin"


class AnnotatorProfile(models.Model):
    """A platform user's role and the guidelines (domains) they are trained on."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.ANNOTATOR)
    skill_helpfulness = models.BooleanField(default=True)
    skill_safety = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(role__in=Role.values), name="profile_role_valid")]

    def __str__(self) -> str:
        return f"{self.user} ({self.role})"

    @property
    def domains(self) -> list[str]:
        """The task domains this annotator may be served."""
        return [d for d, ok in (("helpfulness", self.skill_helpfulness), ("safety", self.skill_safety)) if ok]

    @property
    def pseudonym(self) -> str:
        return annotator_pseudonym(self.user_id)

    def has_role(self, *roles: str) -> bool:
        return self.role in roles
