"""Who may call what: every endpoint of the OpenAPI schema against every role, from one table.

An endpoint that appears in the schema without a row here fails the test, so a new endpoint cannot ship
without a rule. "Allowed" means the permission layer let the request through (any answer but 401/403, and
never a 5xx); the request bodies are empty, so most allowed writes answer 400.
"""

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from drf_spectacular.generators import SchemaGenerator
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from annotation.models import Annotation, PolicyVersion, Prompt, Role
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.services.campaigns import campaign_create
from annotation.tests.factories import BatchFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db

ROLES = ("anonymous", "annotator", "reviewer", "researcher", "admin", "no_profile")
EVERYONE = frozenset(ROLES)
SIGNED_IN = EVERYONE - {"anonymous"}  # a user without a profile is an annotator (the profile's default role)
REVIEWERS = frozenset({"reviewer", "researcher", "admin"})
RESEARCHERS = frozenset({"researcher", "admin"})

# (method, path as in the schema) -> the roles allowed. Annotators see their own work and counts only:
# batch figures, quality figures and the model registry would tell them which tasks are gold and who chose what.
ACCESS = {
    ("POST", "/api/v1/auth/token/"): EVERYONE,
    ("GET", "/api/v1/annotations/"): SIGNED_IN,  # their own only
    ("GET", "/api/v1/annotations/{id}/"): SIGNED_IN,  # their own only (404 otherwise)
    ("GET", "/api/v1/annotators/me/"): SIGNED_IN,  # their own counts
    ("GET", "/api/v1/annotators/quality/"): REVIEWERS,
    ("GET", "/api/v1/backlogs/"): REVIEWERS,
    ("GET", "/api/v1/batches/"): REVIEWERS,
    ("POST", "/api/v1/batches/"): RESEARCHERS,
    ("GET", "/api/v1/batches/{id}/"): REVIEWERS,
    ("POST", "/api/v1/batches/{id}/close/"): RESEARCHERS,
    ("GET", "/api/v1/batches/{id}/stats/"): REVIEWERS,
    ("POST", "/api/v1/comparisons/import/"): RESEARCHERS,
    ("GET", "/api/v1/export/comparisons.jsonl"): RESEARCHERS,
    ("GET", "/api/v1/policies/"): REVIEWERS,
    ("POST", "/api/v1/policies/"): RESEARCHERS,
    ("GET", "/api/v1/policies/{id}/"): REVIEWERS,
    ("POST", "/api/v1/policies/{id}/current/"): RESEARCHERS,
    ("GET", "/api/v1/prompts/"): SIGNED_IN,  # their own only; reviewers and up all
    ("POST", "/api/v1/prompts/"): SIGNED_IN,
    ("GET", "/api/v1/prompts/{id}/"): SIGNED_IN,
    ("GET", "/api/v1/reward-models/"): REVIEWERS,
    ("POST", "/api/v1/reward-models/"): RESEARCHERS,
    ("GET", "/api/v1/reward-models/{id}/"): REVIEWERS,
    ("GET", "/api/v1/campaigns/"): REVIEWERS,
    ("POST", "/api/v1/campaigns/"): RESEARCHERS,
    ("GET", "/api/v1/campaigns/{id}/"): REVIEWERS,
    ("POST", "/api/v1/campaigns/{id}/close/"): RESEARCHERS,
    ("GET", "/api/v1/campaigns/{id}/results/"): REVIEWERS,
    ("POST", "/api/v1/evaluations/next/"): SIGNED_IN,
    ("POST", "/api/v1/evaluations/{item_id}/submit/"): SIGNED_IN,  # an item they hold
    ("POST", "/api/v1/tasks/next/"): SIGNED_IN,
    ("POST", "/api/v1/tasks/{task_id}/submit/"): SIGNED_IN,  # a task they hold
    ("POST", "/api/v1/tasks/{task_id}/skip/"): SIGNED_IN,
    ("POST", "/api/v1/tasks/{task_id}/release/"): SIGNED_IN,
    ("POST", "/api/v1/tasks/{task_id}/responses/"): RESEARCHERS,  # model workers
    ("GET", "/api/v1/tasks/waiting/"): RESEARCHERS,
    ("GET", "/api/v1/training-runs/"): REVIEWERS,
    ("GET", "/api/v1/training-runs/{id}/"): REVIEWERS,
    ("POST", "/api/v1/training-runs/"): RESEARCHERS,
    ("POST", "/api/v1/training-runs/{id}/cancel/"): RESEARCHERS,
}


def schema_operations() -> set[tuple[str, str]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    methods = {"get", "post", "put", "patch", "delete"}
    return {(m.upper(), path) for path, ops in schema["paths"].items() for m in ops if m in methods}


def test_every_schema_endpoint_has_a_rule_and_every_rule_an_endpoint():
    operations = schema_operations()
    assert operations - set(ACCESS) == set(), "endpoints without an access rule: add them to ACCESS"
    assert set(ACCESS) - operations == set(), "rules for endpoints the schema no longer has"


@pytest.fixture
def clients() -> dict[str, APIClient]:
    users = {
        "annotator": annotator("ann-access"),
        "reviewer": annotator("rev-access", role=Role.REVIEWER),
        "researcher": annotator("res-access", role=Role.RESEARCHER),
        "admin": get_user_model().objects.create_superuser("admin-access", password="pw-for-tests-123"),
        "no_profile": get_user_model().objects.create_user("bare-access", password="pw-for-tests-123"),
    }
    clients = {"anonymous": APIClient()}
    for role, user in users.items():
        clients[role] = APIClient()
        clients[role].credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return clients


@pytest.fixture
def path_ids() -> dict[str, int]:
    """Real ids for the paths' parameters, so that an allowed request reaches its view."""
    batch = BatchFactory(name="access", overlap=3)
    tasks = make_tasks(batch, 4)
    writer = annotator("writer-access")
    lease = assignment_claim_next(user=writer)
    annotation_submit(user=writer, task_id=lease.task_id, choice="a", strength="better", time_on_task_ms=9000)
    return {
        "batches": batch.id,
        "policies": PolicyVersion.objects.get(name="SFT").id,
        "annotations": Annotation.objects.get().id,
        "prompts": Prompt.objects.first().id,
        "reward-models": 1,
        "training-runs": 1,
        "tasks": tasks[1].id,
        "campaigns": campaign_create(name="access-campaign", kind="rating", policy="SFT", overlap=1, prompts=[
            {"dialogue": [{"role": "user", "content": "Hi"}], "response": "Hello"}]).id,  # fmt: skip
        "evaluations": 1,
    }


def concrete(path: str, ids: dict[str, int]) -> str:
    return re.sub(r"\{[a-z_]+\}", lambda _: str(ids[path.split("/")[3]]), path)


@pytest.mark.parametrize("role", ROLES)
def test_every_endpoint_answers_each_role_by_the_table(role, clients, path_ids):
    client = clients[role]
    wrong = []
    for (method, path), allowed_roles in sorted(ACCESS.items()):
        url = concrete(path, path_ids)
        response = getattr(client, method.lower())(url, {} if method == "GET" else b"{}", **(
            {} if method == "GET" else {"content_type": "application/json"}))  # fmt: skip
        assert response.status_code < 500, (method, url, response.status_code)
        allowed = response.status_code not in (401, 403)
        if allowed != (role in allowed_roles):
            wrong.append((method, url, response.status_code))
    assert wrong == [], f"{role}: answers that break the access table"


def test_an_annotator_sees_only_their_own_work_and_counts():
    batch = BatchFactory(name="own", overlap=2)
    make_tasks(batch, 2)
    make_tasks(batch, 1, gold=True)
    me, other = annotator("me-own"), annotator("other-own")
    for user in (me, other, other):
        if lease := assignment_claim_next(user=user):
            annotation_submit(user=user, task_id=lease.task_id, choice="b", strength="better", time_on_task_ms=9000)
    client = APIClient()
    client.force_authenticate(me)
    mine = client.get("/api/v1/annotations/").json()["results"]
    assert [a["id"] for a in mine] == list(Annotation.objects.filter(annotator=me).values_list("id", flat=True))
    counts = client.get("/api/v1/annotators/me/").json()
    # Exactly these fields: nothing about gold, agreement or other annotators.
    assert counts == {"username": "me-own", "role": "annotator", "domains": ["helpfulness"], "annotations": 1,
                      "annotations_today": 1}  # fmt: skip
    theirs = Annotation.objects.filter(annotator=other).first()
    assert client.get(f"/api/v1/annotations/{theirs.id}/").status_code == 404


def test_schema_ui_is_served_from_the_project_not_a_cdn():
    client = APIClient()
    client.force_authenticate(annotator("ui-reader"))
    html = client.get("/api/schema/ui/").content.decode()
    assert "cdn.jsdelivr.net" not in html
    assert "unpkg.com" not in html
    assets = re.findall(r"""(?:src|href)=["']/static/([^"']+)["']""", html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets), html[:2000]
    assert all(finders.find(a) for a in assets), assets
