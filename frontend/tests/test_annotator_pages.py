"""What a new annotator and reviewer hit: the remaining count, today's work with undo, the review page's
continuation text and "next", and a 403 page with the navigation."""

import json

import pytest
from django.utils import timezone

from annotation.models import (
    Adjudication,
    Annotation,
    Assignment,
    Batch,
    ComparisonTask,
    TaskSlot,
    TaskStatus,
)
from annotation.models.tasks import SlotState
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.tests.factories import annotator, make_tasks

pytestmark = pytest.mark.django_db


def post(client, url, body=None):
    return client.post(url, json.dumps(body or {}), content_type="application/json")


def answer(client, choice="a", strength="better", **extra):
    task_id = post(client, "/annotate/next/").json()["task"]["task_id"]
    post(client, f"/annotate/{task_id}/submit/", {"choice": choice, "strength": strength, **extra})
    return task_id


def assert_slots_match_counts(*tasks):
    for task in tasks:
        task.refresh_from_db()
        filled = TaskSlot.objects.filter(task=task, state=SlotState.FILLED).count()
        assert filled == task.annotation_count == Annotation.objects.filter(task=task).count()


# --- "about N left" -------------------------------------------------------------------------------------


def test_remaining_counts_only_the_domains_the_annotator_can_get(annotator_client, batch):
    make_tasks(batch, 2)  # helpfulness
    make_tasks(batch, 5, domain="safety")  # annotator_client has no safety skill
    progress = post(annotator_client, "/annotate/next/").json()["progress"]
    assert progress["batch_remaining"] == 2  # both helpfulness tasks, the one on screen included


def test_remaining_is_never_zero_with_a_task_on_screen(annotator_client, batch):
    make_tasks(batch, 1)
    data = post(annotator_client, "/annotate/next/").json()
    assert data["task"] is not None
    assert data["progress"]["batch_remaining"] == 1


# --- today's work and undo -------------------------------------------------------------------------------


def test_today_lists_the_annotators_own_answers(annotator_client, tasks):
    first = answer(annotator_client, "b", "slightly_better")
    make_tasks(tasks[0].batch, 1, domain="safety")
    other = annotator("someone-else", safety=True, helpful=False)  # answers another task: mine stays open
    held = assignment_claim_next(user=other)
    annotation_submit(user=other, task_id=held.task_id, choice="a", strength="better", safety_label="both_safe")
    html = annotator_client.get("/annotate/today/").content.decode()
    assert 'id="history"' in html
    row = html.split('id="history"')[1]
    assert f"<td>{first}</td><td>week-1</td><td>B is better</td><td>Slightly better</td>" in row
    assert row.count("<tr>") == 2  # header and the one answer: nobody else's
    assert f"/annotate/undo/{Annotation.objects.get(task_id=first, annotator=annotator_client.user).id}/" in html
    assert 'href="/annotate/today/"' in annotator_client.get("/annotate/").content.decode()  # linked from the workbench


def test_undo_deletes_the_last_answer_and_frees_its_slot(annotator_client, tasks):
    task_id = answer(annotator_client)
    annotation = Annotation.objects.get(task_id=task_id, annotator=annotator_client.user)
    response = annotator_client.post(f"/annotate/undo/{annotation.id}/", follow=True)
    assert "was withdrawn" in response.content.decode()
    assert not Annotation.objects.filter(pk=annotation.pk).exists()
    assert not Assignment.objects.filter(task_id=task_id, annotator=annotator_client.user).exists()
    task = ComparisonTask.objects.get(pk=task_id)
    assert (task.annotation_count, task.status) == (0, TaskStatus.OPEN)
    assert TaskSlot.objects.filter(task=task, state=SlotState.FREE).count() == 2
    assert_slots_match_counts(*tasks)
    # The freed slot is served again (first in task order once the lease on the next task is done).
    held = Assignment.objects.get(annotator=annotator_client.user, status="leased")
    post(annotator_client, f"/annotate/{held.task_id}/skip/")
    assert Assignment.objects.get(annotator=annotator_client.user, status="leased").task_id == task_id


def test_undo_is_refused_for_an_older_answer_or_someone_elses(annotator_client, tasks):
    first = answer(annotator_client)
    answer(annotator_client)
    older = Annotation.objects.get(task_id=first, annotator=annotator_client.user)
    html = annotator_client.post(f"/annotate/undo/{older.id}/", follow=True).content.decode()
    assert "Not undone: only your most recent answer can be undone." in html
    assert Annotation.objects.filter(pk=older.pk).exists()
    other = annotator("other")
    held = assignment_claim_next(user=other)
    theirs = annotation_submit(user=other, task_id=held.task_id, choice="a", strength="better").annotation
    html = annotator_client.post(f"/annotate/undo/{theirs.id}/", follow=True).content.decode()
    assert "is not one of yours" in html
    assert Annotation.objects.filter(pk=theirs.pk).exists()
    assert_slots_match_counts(*tasks)


def test_undo_is_refused_once_the_task_is_complete_or_the_batch_closed(annotator_client, tasks):
    task_id = answer(annotator_client)
    other = annotator("other")
    held = assignment_claim_next(user=other)
    assert held.task_id == task_id
    annotation_submit(user=other, task_id=task_id, choice="a", strength="better")  # overlap 2 reached
    mine = Annotation.objects.get(task_id=task_id, annotator=annotator_client.user)
    # Now mine is not other's latest, but it is mine: refused because the task is complete.
    html = annotator_client.post(f"/annotate/undo/{mine.id}/", follow=True).content.decode()
    assert "is complete; its answers can no longer be undone" in html
    assert "can no longer be undone: its comparison is complete" in annotator_client.get("/annotate/today/").content.decode()
    assert Annotation.objects.filter(pk=mine.pk).exists()

    second = answer(annotator_client)
    last = Annotation.objects.get(task_id=second, annotator=annotator_client.user)
    Batch.objects.filter(pk=tasks[0].batch_id).update(status="closed", closed_at=timezone.now())
    html = annotator_client.post(f"/annotate/undo/{last.id}/", follow=True).content.decode()
    assert "batch &#x27;week-1&#x27; is closed" in html
    assert Annotation.objects.filter(pk=last.pk).exists()
    assert_slots_match_counts(*tasks)


def test_undo_is_refused_when_the_answer_continued_the_dialogue(annotator_client, tasks):
    task_id = answer(annotator_client, continue_with="And then?")
    mine = Annotation.objects.get(task_id=task_id, annotator=annotator_client.user)
    html = annotator_client.post(f"/annotate/undo/{mine.id}/", follow=True).content.decode()
    assert "opened comparison" in html
    assert Annotation.objects.filter(pk=mine.pk).exists()


def test_undo_needs_a_post(annotator_client, tasks):
    answer(annotator_client)
    mine = Annotation.objects.get(annotator=annotator_client.user)
    assert annotator_client.get(f"/annotate/undo/{mine.id}/").status_code == 405


# --- review pages ----------------------------------------------------------------------------------------


def _dispute(tasks, n=1, continue_with=""):
    for name, choice in (("d1", "a"), ("d2", "b")):
        user = annotator(name)
        for _ in range(n):
            held = assignment_claim_next(user=user)
            annotation_submit(user=user, task_id=held.task_id, choice=choice, strength="better",
                              continue_with=continue_with if choice == "b" else "")  # fmt: skip
    return [t.id for t in tasks[:n]]


def test_review_page_shows_the_continuation_and_the_hotkeys(reviewer_client, tasks):
    [task_id] = _dispute(tasks, continue_with="What about paracetamol?")
    html = reviewer_client.get(f"/review/{task_id}/").content.decode()
    assert "What about paracetamol?" in html
    assert "Continued with" in html
    assert "review.js" in html
    assert 'data-keys="1:choice:a 2:choice:b a:strength:significantly_better' in html


def test_a_decision_goes_on_to_the_next_item_in_the_queue(reviewer_client, tasks):
    first, second = _dispute(tasks, n=2)
    assert f'href="/review/{second}/"' in reviewer_client.get(f"/review/{first}/").content.decode()
    response = reviewer_client.post(f"/review/{first}/", {"choice": "b", "strength": "better", "reason": "B is right"})
    assert response.status_code == 302
    assert response["Location"] == f"/review/{second}/"
    response = reviewer_client.post(f"/review/{second}/", {"choice": "a", "strength": "better", "reason": "A is right"})
    assert response["Location"] == "/review/"  # nothing left: back to the queue
    assert Adjudication.objects.count() == 2


def test_a_forbidden_page_keeps_the_navigation(annotator_client):
    response = annotator_client.get("/dashboard/")
    assert response.status_code == 403
    html = response.content.decode()
    assert '<nav aria-label="Main">' in html
    assert 'href="/annotate/"' in html
    assert "Your role does not allow this page." in html
    assert 'href="/dashboard/"' not in html  # the nav lists only what the role may open
