"""One validation layer (annotation.validation): the same input gets the same 400 and message from the API,
the annotation page and the importers, and nothing is stored."""

import json

import pytest
from rest_framework.test import APIClient

from annotation.models import (
    Annotation,
    Assignment,
    ComparisonTask,
    Prompt,
    RewardModelVersion,
    Role,
    TaskStatus,
)
from annotation.services.errors import InvalidInput
from annotation.services.imports import ComparisonRecord, ResponseRecord, check_record
from annotation.validation import check_json, check_text, check_time_on_task_ms

from .factories import BatchFactory, PolicyFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db

NUL, SURROGATE = "x\u0000y", "\udc80"


def _api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def _api_message(body: dict, field: str) -> str:
    """The API's message about `field`: a serializer's `{field: [message]}` or a service's `{detail, field}`."""
    if field in body:
        (message,) = body[field]
        return message
    assert body["field"] == field
    return body["detail"]


def _post_json(client, url, body):
    # json.dumps escapes NULs and surrogates ("\u0000", "\udc80"): the bytes on the wire are what a client sends.
    return client.post(url, json.dumps(body), content_type="application/json")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (NUL, "note contains a NUL character (\\u0000), which cannot be stored"),
        (SURROGATE, "note contains a lone surrogate (\\udc80), which is not valid Unicode text"),
        (123, "note must be text, got a number"),
        (["a"], "note must be text, got a list"),
        ("x" * 10_001, "note is longer than 10000 characters"),
    ],
)
def test_check_text_messages(value, message):
    with pytest.raises(InvalidInput) as e:
        check_text(value, field="note", max_length=10_000)
    assert (e.value.message, e.value.field) == (message, "note")


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({NUL: 1}, 'sampling has a key that contains a NUL'),
        ({SURROGATE: 1}, "sampling has a key that contains a lone surrogate"),
        ({"a": {"b": [1, NUL]}}, 'sampling["a"]["b"][1] contains a NUL'),
        ({"a": [SURROGATE]}, 'sampling["a"][0] contains a lone surrogate'),
        ({"a": float("nan")}, 'sampling["a"] is nan'),
        ({"a": "x" * 200_000}, "longer than 100000 characters as JSON"),
    ],
)
def test_check_json_refuses_at_any_depth(value, path):
    with pytest.raises(InvalidInput, match=path.replace("[", r"\[").replace("]", r"\]")):
        check_json(value, field="sampling")
    assert check_json({"temperature": 0.7, "stop": ["\n"], "nested": {"ok": None}}, field="sampling")


def test_one_time_on_task_rule():
    assert check_time_on_task_ms(None) is None
    assert check_time_on_task_ms(86_400_000) == 86_400_000
    assert check_time_on_task_ms("1500") == 1500  # a form post carries text
    for bad in (-1, 10**12, True, 1.5, "soon", [1]):
        with pytest.raises(InvalidInput, match="time_on_task_ms must be a whole number"):
            check_time_on_task_ms(bad)


# The submit of the API and of the annotation page: the same input, the same 400 and message.
SUBMIT_CASES = [
    ("note", NUL, "note contains a NUL character (\\u0000), which cannot be stored"),
    ("note", SURROGATE, "note contains a lone surrogate (\\udc80), which is not valid Unicode text"),
    ("note", 123, "note must be text, got a number"),
    ("continue_with", NUL, "continue_with contains a NUL character (\\u0000), which cannot be stored"),
    ("continue_with", SURROGATE, "continue_with contains a lone surrogate (\\udc80), which is not valid Unicode text"),
    ("continue_with", 7, "continue_with must be text, got a number"),
    ("choice", SURROGATE, "choice contains a lone surrogate (\\udc80), which is not valid Unicode text"),
    ("strength", NUL, "strength contains a NUL character (\\u0000), which cannot be stored"),
    ("time_on_task_ms", 10**12, "time_on_task_ms must be a whole number of milliseconds from 0 to 86400000"),
    ("safety_label", "both_safe", "safety_label is for safety tasks; this is a helpfulness task"),
]


@pytest.mark.parametrize(("field", "value", "message"), SUBMIT_CASES)
def test_submit_refuses_the_same_input_with_the_same_message_on_the_api_and_the_page(client, field, value, message):
    make_tasks(BatchFactory(overlap=1), 2)
    user = annotator("ann")
    api = _api(user)
    client.force_login(user)
    body = {"choice": "a", "strength": "better", field: value}

    task_id = api.post("/api/v1/tasks/next/").json()["task_id"]
    from_api = _post_json(api, f"/api/v1/tasks/{task_id}/submit/", body)
    assert from_api.status_code == 400, from_api.content
    assert _api_message(from_api.json(), field).startswith(message), from_api.json()

    from_page = _post_json(client, f"/annotate/{task_id}/submit/", body)
    assert from_page.status_code == 400, from_page.content
    error = from_page.json()["error"]
    assert error["message"].startswith(message)
    assert error["field"] == field
    assert not Annotation.objects.exists()
    assert Assignment.objects.get().status == "leased"
    assert ComparisonTask.objects.count() == 2  # no continuation opened


def test_a_nul_anywhere_in_the_pages_body_is_refused(annotator_client_json):
    client, task_id = annotator_client_json
    response = _post_json(client, f"/annotate/{task_id}/submit/", {"choice": "a", "strength": "better", "x": {NUL: 1}})
    assert response.status_code == 400
    assert "contains a NUL" in response.json()["error"]["message"]
    deep = client.post(f"/annotate/{task_id}/submit/", "[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert deep.status_code == 400
    assert "nested too deeply" in deep.json()["error"]["message"]
    assert not Annotation.objects.exists()


@pytest.fixture
def annotator_client_json(client):
    make_tasks(BatchFactory(overlap=1), 1)
    user = annotator("ann")
    client.force_login(user)
    task_id = _post_json(client, "/annotate/next/", {}).json()["task"]["task_id"]
    return client, task_id


@pytest.mark.parametrize("bad", [NUL, SURROGATE])
@pytest.mark.parametrize("where", ["key", "value"])
def test_policy_metrics_with_a_nul_or_surrogate_are_a_400(bad, where):
    researcher = annotator("lead", role=Role.RESEARCHER)
    metrics = {bad: 1} if where == "key" else {"win_rate": {"vs": [bad]}}
    response = _post_json(_api(researcher), "/api/v1/reward-models/",
                          {"name": "RM-V9", "kind": "helpfulness", "metrics": metrics})  # fmt: skip
    assert response.status_code == 400, response.content
    assert "metrics" in response.json()
    assert not RewardModelVersion.objects.filter(name="RM-V9").exists()


@pytest.mark.parametrize("bad", [NUL, SURROGATE])
@pytest.mark.parametrize("where", ["key", "value"])
def test_import_sampling_with_a_nul_or_surrogate_is_a_400_and_stores_nothing(bad, where):
    researcher = annotator("lead", role=Role.RESEARCHER)
    BatchFactory(name="wk")
    PolicyFactory(name="SFT")
    sampling = {bad: 0.7} if where == "key" else {"stop": [bad]}
    item = {"prompt": "Hi", "domain": "helpfulness",
            "responses": [{"text": "Hello", "policy_version": "SFT", "sampling": sampling},
                          {"text": "Hey", "policy_version": "SFT"}]}  # fmt: skip
    response = _post_json(_api(researcher), "/api/v1/comparisons/import/", {"batch": "wk", "items": [item]})
    assert response.status_code == 400, response.content
    assert "items" in response.json()
    assert not ComparisonTask.objects.exists()


def test_a_choice_with_a_surrogate_is_a_400_not_a_500_everywhere_in_the_api():
    researcher = annotator("lead", role=Role.RESEARCHER)
    response = _post_json(_api(researcher), "/api/v1/policies/", {"name": "p", "kind": SURROGATE})
    assert response.status_code == 400
    assert response.json()["kind"] == ["kind contains a lone surrogate (\\udc80), which is not valid Unicode text"]


def test_a_nul_in_a_query_parameter_is_a_400():
    researcher = annotator("lead", role=Role.RESEARCHER)
    api = _api(researcher)
    for url in ("/api/v1/export/comparisons.jsonl", "/api/v1/annotators/quality/"):
        response = api.get(url, {"batch": NUL})
        assert response.status_code == 400, url
        assert response.json()["field"] == "batch"


def test_identical_responses_are_refused_by_the_store_the_api_and_a_worker_delivery():
    researcher = annotator("lead", role=Role.RESEARCHER)
    BatchFactory(name="wk")
    PolicyFactory(name="SFT")
    record = ComparisonRecord(turns=(("user", "hi"),), response_a=ResponseRecord("same", "SFT"),
                              response_b=ResponseRecord("same", "SFT"), domain="helpfulness", origin="line 3")  # fmt: skip
    with pytest.raises(InvalidInput, match="line 3: the two responses are identical"):
        check_record(record)
    api = _api(researcher)
    same = [{"text": "same", "policy_version": "SFT"}, {"text": "same", "policy_version": "SFT"}]
    response = _post_json(api, "/api/v1/comparisons/import/",
                          {"batch": "wk", "items": [{"prompt": "hi", "domain": "helpfulness", "responses": same}]})  # fmt: skip
    assert response.status_code == 400
    assert "identical" in response.json()["detail"]
    assert not ComparisonTask.objects.exists()
    task_id = _post_json(api, "/api/v1/prompts/", {"text": "hello", "domain": "helpfulness"}).json()["task_id"]
    delivered = _post_json(api, f"/api/v1/tasks/{task_id}/responses/", {"responses": same})
    assert delivered.status_code == 400
    assert "identical" in delivered.json()["detail"]
    assert ComparisonTask.objects.get().status == TaskStatus.AWAITING_RESPONSES


@pytest.mark.parametrize("text", [NUL, SURROGATE])
def test_the_prompt_form_and_the_api_refuse_a_prompt_with_the_same_message(client, text):
    BatchFactory(name="wk")
    user = annotator("writer")
    message = check_text_message(text, "text")
    api_response = _post_json(_api(user), "/api/v1/prompts/", {"text": text, "domain": "helpfulness"})
    assert api_response.status_code == 400
    assert api_response.json()["text"] == [message]
    client.force_login(user)
    # A form post cannot carry a lone surrogate (Django decodes forms with replacement characters); a NUL it can.
    if text == NUL:
        page = client.post("/prompts/new/", {"domain": "helpfulness", "risk_category": "", "text": text})
        assert page.status_code == 400
        assert message in page.content.decode()
    assert not Prompt.objects.exists()


def check_text_message(value, field) -> str:
    with pytest.raises(InvalidInput) as e:
        check_text(value, field=field)
    return e.value.message


def test_a_safety_label_on_a_safety_task_is_still_taken(client):
    make_tasks(BatchFactory(overlap=1), 1, domain="safety")
    user = annotator("safe", safety=True, helpful=False)
    api = _api(user)
    task_id = api.post("/api/v1/tasks/next/").json()["task_id"]
    ok = _post_json(api, f"/api/v1/tasks/{task_id}/submit/",
                    {"choice": "a", "strength": "better", "safety_label": "both_safe", "time_on_task_ms": "1500"})  # fmt: skip
    assert ok.status_code == 201, ok.content
    assert Annotation.objects.get().time_on_task_ms == 1500
