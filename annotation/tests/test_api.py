import json
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from annotation.models import Annotation, Assignment, Batch, ComparisonTask, Prompt, Response, Role, TaskSlot
from annotation.services.batches import batch_close

from .factories import BatchFactory, PolicyFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db

GOOD = {"choice": "b", "strength": "significantly_better", "time_on_task_ms": 15000}


def client_for(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def researcher():
    return annotator("lead", role=Role.RESEARCHER, safety=True)


def test_token_auth_for_scripts():
    user = annotator("scripted")
    response = APIClient().post(
        "/api/v1/auth/token/", {"username": "scripted", "password": "pw-for-tests-123"}
    )
    assert response.status_code == 200
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert client.get("/api/v1/annotations/").status_code == 200
    assert Token.objects.get(user=user).key == response.json()["token"]
    assert APIClient().get("/api/v1/annotations/").status_code in (401, 403)


def test_claim_submit_round_trip_and_repeated_submit_is_idempotent():
    make_tasks(BatchFactory(), 1)
    client = client_for(annotator())
    task = client.post("/api/v1/tasks/next/").json()
    assert set(task) >= {"task_id", "dialogue", "response_a", "response_b", "expires_at"}
    assert "is_gold" not in task
    assert "policy_version" not in json.dumps(task)
    first = client.post(f"/api/v1/tasks/{task['task_id']}/submit/", GOOD, format="json")
    again = client.post(f"/api/v1/tasks/{task['task_id']}/submit/", GOOD, format="json")
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["annotation"]["id"] == again.json()["annotation"]["id"]
    assert Annotation.objects.count() == 1
    assert ComparisonTask.objects.get().annotation_count == 1
    assert client.post("/api/v1/tasks/next/").status_code == 204


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"choice": "c", "strength": "better"}, "choice"),
        ({"choice": "a", "strength": "much_better"}, "strength"),
        ({"choice": "a"}, "strength"),
        ({"choice": "a", "strength": "better", "time_on_task_ms": -5}, "time_on_task_ms"),
    ],
)
def test_bad_labels_get_a_400_naming_the_field_and_change_nothing(payload, field):
    make_tasks(BatchFactory(), 1)
    client = client_for(annotator())
    task_id = client.post("/api/v1/tasks/next/").json()["task_id"]
    response = client.post(f"/api/v1/tasks/{task_id}/submit/", payload, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not Annotation.objects.exists()
    assert Assignment.objects.get().status == "leased"


def test_safety_task_requires_safety_label():
    make_tasks(BatchFactory(), 1, domain="safety")
    client = client_for(annotator(safety=True))
    task_id = client.post("/api/v1/tasks/next/").json()["task_id"]
    response = client.post(f"/api/v1/tasks/{task_id}/submit/", GOOD, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "safety_label"
    ok = client.post(f"/api/v1/tasks/{task_id}/submit/", {**GOOD, "safety_label": "both_safe"}, format="json")
    assert ok.status_code == 201
    assert Annotation.objects.get().safety_label == "both_safe"


def test_submitting_a_task_you_do_not_hold_is_a_404_and_expired_lease_a_409():
    (task,) = make_tasks(BatchFactory(lease_seconds=30), 1)
    holder, stranger, late = annotator(), annotator(), annotator()
    client_for(holder).post("/api/v1/tasks/next/")
    assert (
        client_for(stranger).post(f"/api/v1/tasks/{task.id}/submit/", GOOD, format="json").status_code == 404
    )
    past = timezone.now() - timedelta(minutes=4)
    Assignment.objects.update(leased_at=past - timedelta(minutes=1), expires_at=past)
    TaskSlot.objects.update(lease_expires_at=past)
    assert client_for(late).post("/api/v1/tasks/next/").json()["task_id"] == task.id
    response = client_for(holder).post(f"/api/v1/tasks/{task.id}/submit/", GOOD, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "lease_expired"


def test_blind_annotators_only_see_their_own_annotations():
    make_tasks(BatchFactory(overlap=2), 1)
    alice, bob = annotator("alice"), annotator("bob")
    for user in (alice, bob):
        c = client_for(user)
        task_id = c.post("/api/v1/tasks/next/").json()["task_id"]
        c.post(f"/api/v1/tasks/{task_id}/submit/", GOOD, format="json")
    mine = client_for(alice).get("/api/v1/annotations/").json()["results"]
    assert len(mine) == 1
    assert Annotation.objects.get(pk=mine[0]["id"]).annotator == alice
    bobs = Annotation.objects.get(annotator=bob)
    assert client_for(alice).get(f"/api/v1/annotations/{bobs.id}/").status_code == 404


def test_written_prompt_waits_for_a_model_worker_then_is_served(researcher):
    BatchFactory(name="week-1")
    PolicyFactory(name="RLHF-V1")
    writer = annotator("writer")
    created = client_for(writer).post(
        "/api/v1/prompts/", {"text": "Name three prime numbers.", "domain": "helpfulness"}
    )
    assert created.status_code == 201
    task_id = created.json()["task_id"]
    assert client_for(writer).post("/api/v1/tasks/next/").status_code == 204  # nothing to compare yet
    waiting = client_for(researcher).get("/api/v1/tasks/waiting/").json()
    assert [w["task_id"] for w in waiting] == [task_id]
    body = {
        "responses": [
            {"text": "2, 3, 5", "policy_version": "RLHF-V1"},
            {"text": "4, 6, 8", "policy_version": "RLHF-V1"},
        ]
    }
    assert (
        client_for(writer).post(f"/api/v1/tasks/{task_id}/responses/", body, format="json").status_code == 403
    )
    assert (
        client_for(researcher).post(f"/api/v1/tasks/{task_id}/responses/", body, format="json").status_code
        == 200
    )
    assert client_for(writer).post("/api/v1/tasks/next/").json()["task_id"] == task_id


def test_safety_prompt_needs_a_risk_category():
    BatchFactory()
    client = client_for(annotator(safety=True))
    response = client.post("/api/v1/prompts/", {"text": "How do I pick a lock?", "domain": "safety"})
    assert response.status_code == 400
    assert response.json()["field"] == "risk_category"
    assert not Prompt.objects.exists()


def test_continue_dialogue_opens_a_pending_comparison_with_the_chosen_reply():
    make_tasks(BatchFactory(), 1)
    client = client_for(annotator())
    task = client.post("/api/v1/tasks/next/").json()
    response = client.post(
        f"/api/v1/tasks/{task['task_id']}/submit/", {**GOOD, "continue_with": "And in French?"}, format="json"
    )
    new = ComparisonTask.objects.get(pk=response.json()["continuation_task_id"])
    assert new.status == "awaiting_responses"
    turns = list(new.dialogue.turns.values_list("role", "text"))
    assert turns == [
        ("user", task["dialogue"][0]["content"]),
        ("assistant", task["response_b"]["text"]),
        ("user", "And in French?"),
    ]


def test_bulk_import_is_all_or_nothing(researcher):
    BatchFactory(name="week-9")
    PolicyFactory(name="SFT")
    item = {
        "prompt": "Hi",
        "domain": "helpfulness",
        "responses": [{"text": "Hello", "policy_version": "SFT"}, {"text": "Hey", "policy_version": "SFT"}],
    }
    bad = {
        **item,
        "responses": [{"text": "Hello", "policy_version": "NOPE"}, {"text": "Hey", "policy_version": "SFT"}],
    }
    client = client_for(researcher)
    response = client.post(
        "/api/v1/comparisons/import/", {"batch": "week-9", "items": [item, bad]}, format="json"
    )
    assert response.status_code == 400
    assert "NOPE" in response.json()["detail"]
    assert not ComparisonTask.objects.exists()
    assert not Response.objects.exists()
    ok = client.post("/api/v1/comparisons/import/", {"batch": "week-9", "items": [item, item]}, format="json")
    assert ok.status_code == 201
    first, second = ok.json()["task_ids"]
    assert first == second  # the same comparison twice in one post is one task
    dialogue = {
        **item,
        "prompt": None,
        "dialogue": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}],
    }
    dialogue.pop("prompt")
    bad_turns = client.post(
        "/api/v1/comparisons/import/", {"batch": "week-9", "items": [dialogue]}, format="json"
    )
    assert bad_turns.status_code == 400
    assert "turn 1" in bad_turns.json()["detail"]


def test_posting_the_same_items_again_returns_their_tasks_and_creates_nothing(researcher):
    BatchFactory(name="week-10")
    PolicyFactory(name="SFT")
    items = [
        {"prompt": f"Question {i}", "domain": "helpfulness",
         "responses": [{"text": f"Answer {i}", "policy_version": "SFT"}, {"text": "Dunno", "policy_version": "SFT"}]}
        for i in range(3)
    ]  # fmt: skip
    client = client_for(researcher)
    first = client.post("/api/v1/comparisons/import/", {"batch": "week-10", "items": items[:2]}, format="json")
    assert (first.status_code, first.json()["created"], first.json()["existing"]) == (201, 2, 0)
    retry = client.post("/api/v1/comparisons/import/", {"batch": "week-10", "items": items[:2]}, format="json")
    assert (retry.status_code, retry.json()["created"], retry.json()["existing"]) == (200, 0, 2)
    assert retry.json()["task_ids"] == first.json()["task_ids"]
    more = client.post("/api/v1/comparisons/import/", {"batch": "week-10", "items": items[::-1]}, format="json")
    assert (more.status_code, more.json()["created"], more.json()["existing"]) == (201, 1, 2)
    assert more.json()["task_ids"][1:] == first.json()["task_ids"][::-1]
    assert ComparisonTask.objects.count() == 3
    assert Response.objects.count() == 6
    batch_close(batch_id=Batch.objects.get(name="week-10").id)
    late = client.post("/api/v1/comparisons/import/", {"batch": "week-10", "items": items[:1]}, format="json")
    assert (late.status_code, late.json()["task_ids"]) == (200, first.json()["task_ids"][:1])  # a retry still works
    new = {**items[0], "prompt": "A new question"}
    closed = client.post("/api/v1/comparisons/import/", {"batch": "week-10", "items": [new]}, format="json")
    assert closed.status_code == 409
    Batch.objects.filter(name="week-10").update(status="open", closed_at=None)
    other_policy = {**items[0], "responses": [{"text": "Answer 0", "policy_version": "SFT"},
                                              {"text": "Dunno", "policy_version": "RLHF-V1"}]}  # fmt: skip
    PolicyFactory(name="RLHF-V1")
    client.post("/api/v1/comparisons/import/", {"batch": "week-10", "items": [other_policy]}, format="json")
    assert ComparisonTask.objects.count() == 4  # same texts from another policy: another comparison


def test_roles_guard_batches_import_and_export(researcher):
    worker = annotator()
    assert client_for(worker).post("/api/v1/batches/", {"name": "x"}).status_code == 403
    assert client_for(worker).get("/api/v1/export/comparisons.jsonl").status_code == 403
    assert client_for(worker).post("/api/v1/comparisons/import/", {}, format="json").status_code == 403
    created = client_for(researcher).post(
        "/api/v1/batches/", {"name": "week-2", "overlap": 3, "gold_rate": 0.1}
    )
    assert created.status_code == 201
    assert Batch.objects.get(name="week-2").overlap == 3
    assert (
        client_for(researcher).post("/api/v1/batches/", {"name": "week-3", "overlap": 0}).status_code == 400
    )


def test_batch_stats_and_close_fixes_the_split(researcher):
    batch = BatchFactory(test_size=3, overlap=2)
    make_tasks(batch, 10)
    users = [annotator() for _ in range(2)]
    for user in users:
        c = client_for(user)
        for _ in range(4):
            t = c.post("/api/v1/tasks/next/").json()
            c.post(
                f"/api/v1/tasks/{t['task_id']}/submit/",
                {**GOOD, "choice": "a" if user == users[0] else "b"},
                format="json",
            )
    stats = client_for(researcher).get(f"/api/v1/batches/{batch.id}/stats/").json()
    assert stats["annotations"] == 8
    assert stats["progress"] == pytest.approx(8 / 20)
    assert stats["agreement"]["percent_agreement"] == 0.0  # the two always disagree
    closed = client_for(researcher).post(f"/api/v1/batches/{batch.id}/close/")
    assert closed.json()["status"] == "closed"
    splits = list(ComparisonTask.objects.filter(batch=batch).values_list("split", flat=True))
    assert splits.count("test") == 3
    assert splits.count("train") == 7
    assert client_for(annotator()).post("/api/v1/tasks/next/").status_code == 204  # closed: nothing served
    assert client_for(researcher).post(f"/api/v1/batches/{batch.id}/close/").status_code == 409


def test_throttling_on_claim(monkeypatch):
    from rest_framework.throttling import ScopedRateThrottle

    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "claim", "3/min")
    make_tasks(BatchFactory(), 1)
    client = client_for(annotator("hasty"))
    codes = [client.post("/api/v1/tasks/next/").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def test_malformed_json_is_a_400():
    make_tasks(BatchFactory(), 1)
    client = client_for(annotator())
    task_id = client.post("/api/v1/tasks/next/").json()["task_id"]
    response = client.post(f"/api/v1/tasks/{task_id}/submit/", "{not json", content_type="application/json")
    assert response.status_code == 400
