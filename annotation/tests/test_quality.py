from datetime import timedelta

import pytest
from django.contrib.admin.sites import site
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from annotation.models import Annotation, Assignment, ComparisonTask, Role
from annotation.services import assignment as assignment_service
from annotation.services.assignment import annotation_submit, assignment_claim_next

from .factories import BatchFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db


def test_too_fast_submissions_are_flagged_by_the_batch_floor():
    make_tasks(BatchFactory(too_fast_seconds=5), 2)
    user = annotator()
    fast = assignment_claim_next(user=user)
    annotation_submit(user=user, task_id=fast.task_id, choice="a", strength="better", time_on_task_ms=1200)
    slow = assignment_claim_next(user=user)
    annotation_submit(user=user, task_id=slow.task_id, choice="a", strength="better", time_on_task_ms=30_000)
    flags = dict(Annotation.objects.values_list("task_id", "too_fast"))
    # The server also saw the second one come back at once: the shorter of the two times counts.
    assert flags[fast.task_id] is True
    assert flags[slow.task_id] is True
    stats = APIClient()
    stats.force_authenticate(annotator("lead", role=Role.RESEARCHER))
    batch_id = fast.task.batch_id
    assert stats.get(f"/api/v1/batches/{batch_id}/stats/").json()["too_fast_rate"] == 1.0


def test_gold_accuracy_per_annotator():
    batch = BatchFactory(gold_rate=1.0, overlap=2)
    make_tasks(batch, 4)
    make_tasks(batch, 2, gold=True)  # gold answer "a"
    assignment_service.gold_rng.seed(0)
    good, sloppy = annotator("good"), annotator("sloppy")
    for user, answer in ((good, "a"), (sloppy, "b")):
        while (lease := assignment_claim_next(user=user)) is not None:
            annotation_submit(user=user, task_id=lease.task_id, choice=answer, strength="better", time_on_task_ms=9000)
    client = APIClient()
    client.force_authenticate(annotator("lead", role=Role.RESEARCHER))
    rows = {r["username"]: r for r in client.get(f"/api/v1/annotators/quality/?batch={batch.name}").json()}
    assert rows["good"]["gold_answered"] == 2
    assert rows["good"]["gold_accuracy"] == 1.0
    assert rows["sloppy"]["gold_accuracy"] == 0.0
    stats = client.get(f"/api/v1/batches/{batch.id}/stats/").json()
    assert stats["gold_accuracy"] == 0.5
    assert stats["gold_tasks"] == 2
    assert client.get("/api/v1/annotators/quality/?batch=nope").status_code == 404


def test_every_model_has_a_working_admin_changelist(client):
    make_tasks(BatchFactory(), 2)
    admin = annotator("boss", role=Role.ADMIN)
    admin.is_staff = admin.is_superuser = True
    admin.save()
    client.force_login(admin)
    for model in site._registry:
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        assert client.get(url).status_code == 200, url
        assert client.get(url, {"q": "x"}).status_code == 200, url


def test_admin_close_action_fixes_the_split(client):
    batch = BatchFactory(test_size=1)
    make_tasks(batch, 3)
    admin = annotator("boss2", role=Role.ADMIN)
    admin.is_staff = admin.is_superuser = True
    admin.save()
    client.force_login(admin)
    response = client.post(
        reverse("admin:annotation_batch_changelist"), {"action": "close_batches", "_selected_action": [batch.pk]}
    )
    assert response.status_code == 302
    batch.refresh_from_db()
    assert batch.status == "closed"
    assert batch.tasks.filter(split="test").count() == 1


def test_dashboard_stats_of_a_closed_batch_come_from_the_cache_and_of_an_open_one_afresh(django_assert_num_queries):
    from annotation.selectors import batch_stats, batch_stats_cached
    from annotation.services.batches import batch_close

    batch = BatchFactory(overlap=1)
    make_tasks(batch, 3)
    user = annotator()
    lease = assignment_claim_next(user=user)
    assert batch_stats_cached(batch)["annotations"] == 0
    annotation_submit(user=user, task_id=lease.task_id, choice="a", strength="better", time_on_task_ms=9000)
    assert batch_stats_cached(batch)["annotations"] == 1  # open: counted afresh
    batch_close(batch_id=batch.id)
    batch.refresh_from_db()
    first = batch_stats_cached(batch)
    assert first == batch_stats(batch)
    with django_assert_num_queries(2):  # the fingerprint only
        assert batch_stats_cached(batch) == first
    # An annotation that raced the close (its submit read the batch as open) is counted, not hidden by the cache.
    late = assignment_claim_next(user=annotator())
    assert late is None
    task = ComparisonTask.objects.filter(batch=batch, annotation_count=0).first()
    now = timezone.now()
    assignment = Assignment.objects.create(task=task, annotator=user, status="submitted", leased_at=now - timedelta(minutes=1),
                                           expires_at=now, finished_at=now)  # fmt: skip
    Annotation.objects.create(task=task, annotator=user, assignment=assignment, choice="b", strength="better")
    assert batch_stats_cached(batch)["annotations"] == 2


def test_batch_agreement_counted_by_the_database_equals_the_definition():
    """The database counts tasks by their make-up; the result is alpha and percent agreement of the units."""
    from collections import defaultdict

    from annotation.agreement import krippendorff_alpha, percent_agreement
    from annotation.scales import signed_preference
    from annotation.selectors import batch_agreement
    from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store

    from .factories import PolicyFactory

    batch = BatchFactory(name="agreement", overlap=3)
    PolicyFactory(name="SFT")
    votes = [  # each task's votes: (choice, strength), "" where an imported vote has no strength
        [("a", "better"), ("a", "better"), ("b", "slightly_better")],
        [("a", "significantly_better"), ("a", "better")],
        [("b", "negligibly_better"), ("a", "negligibly_better"), ("b", "")],
        [("b", ""), ("b", "")],
        [("a", "slightly_better"), ("a", "better"), ("a", "better")],
        [("a", "better"), ("a", "better"), ("b", "slightly_better")],  # the make-up of the first task again
        [("a", "better")],  # one vote: no pair, left out
    ]
    records = [
        ComparisonRecord(
            turns=(("user", f"Question {i}?"),),
            response_a=ResponseRecord(f"Answer A {i}.", "SFT"), response_b=ResponseRecord(f"Answer B {i}.", "SFT"),
            domain="helpfulness",
            votes=tuple(VoteRecord(f"ext:rater{j}", c, s) for j, (c, s) in enumerate(task)),
        )
        for i, task in enumerate(votes)
    ]  # fmt: skip
    comparisons_store(batch=batch, records=records, create_external_policies=True)
    result = batch_agreement(batch)

    choices, signed = defaultdict(list), defaultdict(list)
    for task_id, choice, strength in Annotation.objects.filter(
        task__batch=batch, task__annotation_count__gte=2
    ).values_list("task_id", "choice", "strength"):
        choices[task_id].append(choice)
        if strength:
            signed[task_id].append(signed_preference(choice, strength))
    assert result["tasks_with_overlap"] == 6
    assert result["percent_agreement"] == pytest.approx(percent_agreement(choices.values()))
    assert result["alpha_choice"] == pytest.approx(krippendorff_alpha(choices.values(), level="nominal"))
    assert result["alpha_strength_ordinal"] == pytest.approx(krippendorff_alpha(signed.values(), level="ordinal"))
    assert result["alpha_strength_ordinal"] is not None
