"""The workbench's JSON calls: same rules as the API (lease, validation, blindness), errors as 4xx messages."""

import json

import pytest

from annotation.models import Annotation, Assignment, AssignmentStatus, ComparisonTask, TaskStatus
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.tests.factories import annotator, make_tasks

pytestmark = pytest.mark.django_db


def post(client, url, body=None, raw=None):
    return client.post(url, raw if raw is not None else json.dumps(body or {}), content_type="application/json")


def test_pages_need_sign_in(client):
    for url in ("/annotate/", "/prompts/new/", "/guidelines/", "/review/", "/dashboard/"):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/?next="), url
    assert post(client, "/annotate/next/").status_code == 302


def test_annotate_page_renders_keyboard_controls(annotator_client):
    html = annotator_client.get("/annotate/").content.decode()
    for control in ('name="choice" value="a"', 'value="significantly_better" data-key="a"',
                    'value="both_unsafe" data-key="l"', 'id="note"', 'id="continue_with"', "annotate.js"):  # fmt: skip
        assert control in html


def test_next_serves_a_task_with_context_and_own_progress(annotator_client, tasks):
    data = post(annotator_client, "/annotate/next/").json()
    task = data["task"]
    assert task["task_id"] == tasks[0].id
    assert task["dialogue"] == [{"role": "user", "content": "helpfulness prompt 0"}]
    assert (task["response_a"], task["response_b"]) == ("answer A0", "answer B0")
    assert data["progress"] == {"today": 0, "in_batch": 0, "batch_remaining": 3}  # the one on screen counts
    # A repeated call returns the lease already held.
    assert post(annotator_client, "/annotate/next/").json()["task"]["task_id"] == tasks[0].id


def test_blind_nobody_sees_another_annotators_labels(annotator_client, tasks):
    other = annotator("ann2")
    held = assignment_claim_next(user=other)
    annotation_submit(user=other, task_id=held.task_id, choice="b", strength="better", note="SECRET-NOTE-OF-ANN2")
    response = post(annotator_client, "/annotate/next/")
    body = response.content.decode()
    assert response.json()["task"]["task_id"] == held.task_id  # overlap 2: the same comparison
    assert "SECRET-NOTE-OF-ANN2" not in body
    assert "better" not in body
    assert "ann2" not in body
    assert response.json()["progress"]["in_batch"] == 0  # counts only this annotator's own work


def test_submit_stores_the_annotation_and_returns_the_next_task(annotator_client, tasks):
    first = post(annotator_client, "/annotate/next/").json()["task"]["task_id"]
    data = post(annotator_client, f"/annotate/{first}/submit/",
                {"choice": "b", "strength": "slightly_better", "note": "B is concrete", "time_on_task_ms": 9000}).json()  # fmt: skip
    annotation = Annotation.objects.get(task_id=first, annotator=annotator_client.user)
    assert (annotation.choice, annotation.strength, annotation.note, annotation.time_on_task_ms) == (
        "b", "slightly_better", "B is concrete", 9000)  # fmt: skip
    assert data["submitted"] == {"task_id": first, "created": True, "continuation_task_id": None}
    assert data["task"]["task_id"] == tasks[1].id
    assert data["progress"] == {"today": 1, "in_batch": 1, "batch_remaining": None}  # the page counts down


def test_submit_with_a_next_message_continues_the_dialogue(annotator_client, tasks):
    first = post(annotator_client, "/annotate/next/").json()["task"]["task_id"]
    data = post(annotator_client, f"/annotate/{first}/submit/",
                {"choice": "a", "strength": "better", "continue_with": "And in winter?"}).json()  # fmt: skip
    continued = ComparisonTask.objects.get(pk=data["submitted"]["continuation_task_id"])
    assert continued.status == TaskStatus.AWAITING_RESPONSES
    assert continued.context_length == 3
    assert list(continued.dialogue.turns.values_list("text", flat=True)) == [
        "helpfulness prompt 0", "answer A0", "And in winter?"]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"choice": "a", "strength": "much_better"}, "strength"),
        ({"choice": "c", "strength": "better"}, "choice"),
        ({"strength": "better"}, "choice"),
        ({"choice": ["a"], "strength": "better"}, "choice"),
        ({"choice": "a", "strength": "better", "time_on_task_ms": "soon"}, "time_on_task_ms"),
    ],
)
def test_bad_input_is_a_400_with_a_message_and_changes_nothing(annotator_client, tasks, body, field):
    first = post(annotator_client, "/annotate/next/").json()["task"]["task_id"]
    response = post(annotator_client, f"/annotate/{first}/submit/", body)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert response.json()["error"]["message"]
    assert not Annotation.objects.exists()
    assert Assignment.objects.get(task_id=first).status == AssignmentStatus.LEASED


def test_malformed_json_is_a_400(annotator_client, tasks):
    first = post(annotator_client, "/annotate/next/").json()["task"]["task_id"]
    response = post(annotator_client, f"/annotate/{first}/submit/", raw="{not json")
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_safety_task_needs_a_safety_label(client, batch):
    make_tasks(batch, 1, domain="safety")
    user = annotator("safe1", safety=True, helpful=False)
    client.force_login(user)
    task_id = post(client, "/annotate/next/").json()["task"]["task_id"]
    response = post(client, f"/annotate/{task_id}/submit/", {"choice": "a", "strength": "better"})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "safety_label"
    ok = post(client, f"/annotate/{task_id}/submit/", {"choice": "a", "strength": "better", "safety_label": "both_safe"})
    assert ok.status_code == 200
    assert Annotation.objects.get(task_id=task_id).safety_label == "both_safe"


def test_cannot_submit_a_task_held_by_someone_else(annotator_client, tasks):
    other = annotator("ann2")
    held = assignment_claim_next(user=other)
    response = post(annotator_client, f"/annotate/{held.task_id}/submit/", {"choice": "a", "strength": "better"})
    assert response.status_code == 404
    assert "not assigned to you" in response.json()["error"]["message"]
    assert not Annotation.objects.exists()


def test_skip_gives_the_task_back_and_serves_the_next(annotator_client, tasks):
    first = post(annotator_client, "/annotate/next/").json()["task"]["task_id"]
    data = post(annotator_client, f"/annotate/{first}/skip/").json()
    assert data["skipped"] == first
    assert data["task"]["task_id"] == tasks[1].id
    assert Assignment.objects.get(task_id=first).status == AssignmentStatus.SKIPPED
    assert post(annotator_client, f"/annotate/{first}/skip/").status_code == 409


def test_no_work_is_an_empty_payload(annotator_client, batch):
    data = post(annotator_client, "/annotate/next/").json()
    assert data["task"] is None
    assert data["progress"]["today"] == 0


def test_get_is_not_allowed_on_json_calls(annotator_client, tasks):
    assert annotator_client.get("/annotate/next/").status_code == 405


def test_annotator_page_loads_under_300_kb_of_js_and_css(annotator_client):
    import re

    from django.contrib.staticfiles import finders

    html = annotator_client.get("/annotate/").content.decode()
    assets = re.findall(r'<script src="/static/([^"]+)"', html) + re.findall(r'<link rel="stylesheet" href="/static/([^"]+)"', html)
    assert sorted(assets) == ["frontend/annotate.js", "frontend/app.css"]  # nothing from a CDN
    inline = sum(len(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S))
    total = sum(len(open(finders.find(a), "rb").read()) for a in assets) + inline
    assert total < 300_000


def test_the_apis_rate_limits_apply(annotator_client, tasks, monkeypatch):
    from rest_framework.throttling import ScopedRateThrottle

    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"claim": "2/min", "submit": "120/min"})
    assert post(annotator_client, "/annotate/next/").status_code == 200
    assert post(annotator_client, "/annotate/next/").status_code == 200
    response = post(annotator_client, "/annotate/next/")
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "throttled"


def test_submit_and_next_saves_the_submit_but_withholds_the_next_comparison_past_the_claim_limit(
    annotator_client, tasks, monkeypatch
):
    from rest_framework.throttling import ScopedRateThrottle

    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"claim": "1/min", "submit": "120/min"})
    task_id = post(annotator_client, "/annotate/next/").json()["task"]["task_id"]
    response = post(annotator_client, f"/annotate/{task_id}/submit/", {"choice": "a", "strength": "better"})
    assert response.status_code == 200
    data = response.json()
    assert (data["submitted"]["task_id"], data["submitted"]["created"], data["task"]) == (task_id, True, None)
    assert "Too many requests" in data["next_withheld"]
    assert Annotation.objects.filter(task_id=task_id).exists()


def test_the_remaining_count_does_not_tell_a_gold_task_from_another():
    from datetime import timedelta

    from django.utils import timezone

    from annotation.tests.factories import BatchFactory
    from frontend.views.annotate import progress_for

    batch = BatchFactory()
    normal = make_tasks(batch, 2)
    gold = make_tasks(batch, 1, gold=True)[0]
    holds_gold, holds_normal, fresh = annotator("g"), annotator("n"), annotator("f")
    now = timezone.now()
    for user, task in ((holds_gold, gold), (holds_normal, normal[0])):
        Assignment.objects.create(task_id=task.id, annotator=user, leased_at=now, expires_at=now + timedelta(minutes=15))
    before = progress_for(fresh, batch.pk, with_remaining=True)["batch_remaining"]
    with_gold = progress_for(holds_gold, batch.pk, with_remaining=True)["batch_remaining"]
    with_normal = progress_for(holds_normal, batch.pk, with_remaining=True)["batch_remaining"]
    assert with_gold == with_normal == before  # the task held counts as still to do, gold or not
