import factory
from django.contrib.auth import get_user_model

from annotation.models import AnnotatorProfile, Batch, ComparisonTask, PolicyVersion, Role
from annotation.services.imports import ComparisonRecord, ResponseRecord, comparisons_store


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw-for-tests-123")


class ProfileFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AnnotatorProfile
        django_get_or_create = ("user",)

    user = factory.SubFactory(UserFactory)
    role = Role.ANNOTATOR
    skill_helpfulness = True
    skill_safety = False


def annotator(username: str | None = None, *, role: str = Role.ANNOTATOR, safety: bool = False, helpful=True):
    kwargs = {"role": role, "skill_safety": safety, "skill_helpfulness": helpful}
    if username:
        kwargs["user__username"] = username
    return ProfileFactory(**kwargs).user


class BatchFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Batch

    name = factory.Sequence(lambda n: f"week-{n:03d}")
    overlap = 1


class PolicyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PolicyVersion
        django_get_or_create = ("name",)

    name = "SFT"


def make_tasks(batch, n: int, *, domain: str = "helpfulness", gold: bool = False, votes=()):
    """Store `n` new single-turn comparisons in `batch` through the import service (numbered on from the
    batch's tasks, so that a second call adds comparisons rather than finding the first call's)."""
    PolicyFactory(name="SFT")
    first = ComparisonTask.objects.filter(batch=batch).count()
    records = [
        ComparisonRecord(
            turns=(("user", f"{domain} prompt {i}"),),
            response_a=ResponseRecord(f"answer A{i}", "SFT", {"temperature": 0.7}),
            response_b=ResponseRecord(f"answer B{i}", "SFT", {"temperature": 1.0}),
            domain=domain,
            risk_category="illicit_criminal" if domain == "safety" else "",
            gold_choice="a" if gold else "",
            votes=tuple(votes),
        )
        for i in range(first, first + n)
    ]
    return comparisons_store(batch=batch, records=records).tasks
