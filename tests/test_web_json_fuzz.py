"""Fuzzing the annotation page's JSON calls (not in the OpenAPI schema): no body gives a 5xx, and a body the
page refuses for its text (NUL, lone surrogate, not text, too long, time out of range) the API's submit
refuses with the same message (annotation.validation)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from annotation.tests.factories import BatchFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db

POISON = ["x\u0000y", "\u0000", "\udc80", "ok\ud800", "x" * 60_000]
VALID = {
    "choice": ["a", "b"],
    "strength": ["significantly_better", "better", "slightly_better", "negligibly_better"],
    "safety_label": ["", "both_safe"],
    "note": ["", "fine"],
    "continue_with": ["", "And then?"],
    "time_on_task_ms": [None, 0, 15_000],
}
# Messages of the validation layer: the page and the API must give these word for word.
LAYER_WORDS = ("NUL character", "lone surrogate", "must be text", "longer than", "time_on_task_ms must be")

junk = st.one_of(
    st.sampled_from(POISON),
    st.text(max_size=8),
    st.integers(min_value=-(10**13), max_value=10**13),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.lists(st.sampled_from(["a", "\u0000"]), max_size=2),
    st.dictionaries(st.sampled_from(["k", "\u0000", "\udc80"]), st.sampled_from(["v", "\u0000"]), max_size=2),
)
bodies = st.fixed_dictionaries(
    {},
    optional={name: st.one_of(st.sampled_from(values), junk) for name, values in VALID.items()}
    | {"extra": junk, "\udc80": junk, "nested": st.dictionaries(st.sampled_from(POISON + ["k"]), junk, max_size=2)},
)


def _post(client, url, body):
    return client.post(url, json.dumps(body), content_type="application/json")


def _api_messages(body: dict) -> list[str]:
    if "detail" in body:
        return [body["detail"]]
    return [m for messages in body.values() if isinstance(messages, list) for m in messages if isinstance(m, str)]


@pytest.fixture
def setting():
    batch = BatchFactory(name="fuzz", overlap=1)
    make_tasks(batch, 5)
    user = annotator("fuzzer")
    api = APIClient()
    api.force_authenticate(user)
    return batch, user, api


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(body=bodies)
def test_the_pages_json_calls_never_fail_and_refuse_text_as_the_api_does(client, setting, body):
    batch, user, api = setting
    client.force_login(user)
    claimed = _post(client, "/annotate/next/", body)
    assert claimed.status_code == 200, claimed.content
    task = claimed.json()["task"]
    if task is None:
        make_tasks(batch, 5)
        task = _post(client, "/annotate/next/", {}).json()["task"]
    url = f"/annotate/{task['task_id']}/submit/"
    page = _post(client, url, body)
    assert page.status_code < 500, page.content
    if page.status_code == 200:
        return
    message = page.json()["error"]["message"]
    assert message
    api_response = _post(api, f"/api/v1/tasks/{task['task_id']}/submit/", body)
    assert api_response.status_code == 400, (body, message, api_response.content)
    if any(word in message for word in LAYER_WORDS):
        assert message in _api_messages(api_response.json()), (message, api_response.json())
    skipped = _post(client, f"/annotate/{task['task_id']}/skip/", body)
    assert skipped.status_code == 200, skipped.content
