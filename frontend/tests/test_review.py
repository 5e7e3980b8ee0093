"""The review queue: disagreements and missed gold answers; adjudication with a reason."""

from datetime import timedelta

import pytest
from django.utils import timezone

from annotation.models import Adjudication, Assignment
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.services.review import adjudication_create, tasks_needing_review
from annotation.tests.factories import BatchFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db


def label(username, choice, **kwargs):
    user = annotator(username)
    held = assignment_claim_next(user=user)
    annotation_submit(user=user, task_id=held.task_id, choice=choice, strength="better", **kwargs)
    return held.task_id


@pytest.fixture
def disputed(tasks):
    first = label("ann1", "a")
    assert label("ann2", "b") == first
    return first


def test_queue_lists_disagreements_and_missed_gold(reviewer_client, batch, disputed):
    gold_batch = BatchFactory(name="week-gold", gold_rate=0.0)
    [gold] = make_tasks(gold_batch, 1, gold=True)  # gold answer "a"
    user = annotator("ann3")
    now = timezone.now()
    Assignment.objects.create(task=gold, annotator=user, leased_at=now, expires_at=now + timedelta(minutes=15))
    annotation_submit(user=user, task_id=gold.id, choice="b", strength="better")
    ids = [t.id for t in tasks_needing_review()]
    assert ids == [disputed, gold.id]
    html = reviewer_client.get("/review/").content.decode()
    assert "annotators disagree (1 chose A, 1 chose B)" in html
    assert "gold answer missed by 1 of 1" in html


def test_agreeing_tasks_are_not_in_the_queue(tasks):
    first = label("ann1", "a")
    assert label("ann2", "a") == first
    assert not tasks_needing_review().exists()


def test_adjudicate_needs_a_reason(reviewer_client, disputed):
    page = reviewer_client.get(f"/review/{disputed}/").content.decode()
    assert "ann1" in page
    assert "ann2" in page
    response = reviewer_client.post(f"/review/{disputed}/", {"choice": "a", "strength": "better", "reason": "  "})
    assert response.status_code == 400
    assert "This field is required" in response.content.decode()
    assert not Adjudication.objects.exists()


def test_adjudicate_records_the_decision_and_leaves_the_queue(reviewer_client, disputed):
    response = reviewer_client.post(f"/review/{disputed}/", {"choice": "b", "strength": "slightly_better",
                                                             "reason": "B answers the question asked"})  # fmt: skip
    assert response.status_code == 302
    decision = Adjudication.objects.get(task_id=disputed)
    assert (decision.choice, decision.strength, decision.reason, decision.reviewer.username) == (
        "b", "slightly_better", "B answers the question asked", "rev")  # fmt: skip
    assert not tasks_needing_review().exists()
    assert "B · Slightly better — by rev: B answers the question asked" in reviewer_client.get(
        f"/review/{disputed}/").content.decode()  # fmt: skip
    again = reviewer_client.post(f"/review/{disputed}/", {"choice": "a", "strength": "better", "reason": "again"})
    assert again.status_code == 409
    assert "already been adjudicated" in again.content.decode()
    assert Adjudication.objects.count() == 1


def test_adjudication_service_refuses_annotators_and_duplicates(disputed):
    from annotation.services.errors import Conflict, PermissionDenied

    reviewer = annotator("rev2", role="reviewer")
    with pytest.raises(PermissionDenied):
        adjudication_create(reviewer=reviewer, reviewer_role="annotator", task_id=disputed, choice="a",
                            strength="better", reason="r")  # fmt: skip
    adjudication_create(reviewer=reviewer, reviewer_role="reviewer", task_id=disputed, choice="a", strength="better",
                        reason="r")  # fmt: skip
    with pytest.raises(Conflict):
        adjudication_create(reviewer=reviewer, reviewer_role="reviewer", task_id=disputed, choice="a",
                            strength="better", reason="r")  # fmt: skip


def test_review_pages_are_closed_to_annotators(annotator_client, disputed):
    assert annotator_client.get(f"/review/{disputed}/").status_code == 403
    assert annotator_client.post(f"/review/{disputed}/", {"choice": "a", "strength": "better",
                                                          "reason": "mine"}).status_code == 403  # fmt: skip
    assert not Adjudication.objects.exists()
