"""Prompt writing, guidelines, roles, and the home redirect."""

import pytest

from annotation.models import BatchStatus, ComparisonTask, Guideline, Prompt, Role, TaskStatus
from annotation.tests.factories import annotator

from .conftest import client_for

pytestmark = pytest.mark.django_db


def test_login_page_signs_in_and_lands_by_role(client):
    user = annotator("ann9")
    user.set_password("pw-for-tests-123")
    user.save()
    bad = client.post("/login/", {"username": "ann9", "password": "nope"})
    assert bad.status_code == 200
    assert "Wrong username or password" in bad.content.decode()
    response = client.post("/login/", {"username": "ann9", "password": "pw-for-tests-123"}, follow=True)
    assert response.redirect_chain[-1][0] == "/annotate/"


@pytest.mark.parametrize(("role", "landing"), [
    (Role.ANNOTATOR, "/annotate/"), (Role.REVIEWER, "/review/"), (Role.RESEARCHER, "/dashboard/"),
    (Role.ADMIN, "/dashboard/")])  # fmt: skip
def test_home_redirects_by_role(client, role, landing):
    client_for(client, f"u-{role}", role)
    assert client.get("/")["Location"] == landing


@pytest.mark.parametrize(("role", "url", "status"), [
    (Role.ANNOTATOR, "/review/", 403), (Role.ANNOTATOR, "/dashboard/", 403),
    (Role.REVIEWER, "/review/", 200), (Role.REVIEWER, "/dashboard/", 403),
    (Role.RESEARCHER, "/review/", 200), (Role.RESEARCHER, "/dashboard/", 200)])  # fmt: skip
def test_roles_gate_the_review_queue_and_dashboard(client, role, url, status):
    client_for(client, f"u-{role}", role)
    assert client.get(url).status_code == status


def test_write_a_safety_prompt_opens_a_waiting_comparison(client, batch):
    client_for(client, "writer", Role.ANNOTATOR, safety=True)
    response = client.post("/prompts/new/", {"domain": "safety", "risk_category": "unqualified_advice",
                                             "text": "Which pills can I mix?"}, follow=True)  # fmt: skip
    assert "Prompt saved" in response.content.decode()
    prompt = Prompt.objects.get()
    assert (prompt.domain, prompt.risk_category, prompt.author.username) == ("safety", "unqualified_advice", "writer")
    assert ComparisonTask.objects.get(dialogue__prompt=prompt).status == TaskStatus.AWAITING_RESPONSES


@pytest.mark.parametrize(("data", "message"), [
    ({"domain": "safety", "risk_category": "", "text": "x"}, "safety prompts need a risk_category"),
    ({"domain": "helpfulness", "risk_category": "hateful_harmful", "text": "x"}, "only safety prompts"),
    ({"domain": "helpfulness", "risk_category": "", "text": "   "}, "This field is required"),
    ({"domain": "nonsense", "risk_category": "", "text": "x"}, "Select a valid choice"),
])  # fmt: skip
def test_bad_prompt_shows_a_message_and_saves_nothing(client, batch, data, message):
    client_for(client, "writer", Role.ANNOTATOR, safety=True)
    response = client.post("/prompts/new/", data)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Prompt.objects.exists()


def test_prompt_domains_follow_the_annotators_skills(client, batch):
    client_for(client, "helper", Role.ANNOTATOR, safety=False)
    assert 'value="safety"' not in client.get("/prompts/new/").content.decode().split('id="id_domain"')[1].split("</select>")[0]
    response = client.post("/prompts/new/", {"domain": "safety", "risk_category": "hateful_harmful", "text": "x"})
    assert response.status_code == 400
    assert not Prompt.objects.exists()


def test_no_open_batch_is_a_message_not_a_500(client, batch):
    batch.status, batch.closed_at = BatchStatus.CLOSED, "2026-01-01T00:00Z"
    batch.save()
    client_for(client, "writer", Role.ANNOTATOR)
    response = client.post("/prompts/new/", {"domain": "helpfulness", "risk_category": "", "text": "hello"})
    assert response.status_code == 400
    assert "no open batch" in response.content.decode()


def test_guidelines_render_markdown_with_raw_html_escaped(annotator_client):
    Guideline.objects.create(domain="helpfulness", text=(
        "# Be helpful\n\n* **Prefer** specific answers\n\n<script>alert(1)</script>\n\n[bad](javascript:alert(2)) "
        "[good](https://example.org/guide)"))  # fmt: skip
    html = annotator_client.get("/guidelines/helpfulness/").content.decode()
    assert "<h1>Be helpful</h1>" in html
    assert "<strong>Prefer</strong>" in html
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)" in html
    assert "javascript:" not in html
    assert 'href="https://example.org/guide"' in html
    assert "Edit (admins)" not in html


def test_only_admins_edit_guidelines(client, db):
    client_for(client, "plain", Role.ANNOTATOR)
    assert client.post("/guidelines/safety/", {"text": "# hacked"}).status_code == 403
    assert not Guideline.objects.exists()
    admin = client_for(client, "boss", Role.ADMIN)
    admin.post("/guidelines/safety/", {"text": "# Safety first"})
    guideline = Guideline.objects.get(domain="safety")
    assert guideline.text == "# Safety first"
    assert guideline.updated_by.username == "boss"
    assert client.get("/guidelines/nonsense/").status_code == 404


def test_the_demo_works_for_every_demo_user(client):
    from django.core.management import call_command

    call_command("load_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    for username, landing in (("annotator1", "/annotate/"), ("reviewer", "/review/"), ("researcher", "/dashboard/"),
                              ("admin", "/dashboard/")):  # fmt: skip
        assert client.login(username=username, password="demo-password")
        response = client.get("/", follow=True)
        assert response.redirect_chain[-1][0] == landing
        assert response.status_code == 200
    client.login(username="annotator1", password="demo-password")
    task = client.post("/annotate/next/", "{}", content_type="application/json").json()["task"]
    assert task["batch"] == "demo-week-1"
    assert task["response_a"]
    safety = client.get("/guidelines/safety/").content.decode()
    assert "<h1>Safety</h1>" in safety
    assert "<td>both unsafe</td>" in safety  # the Markdown table rendered
    Guideline.objects.filter(domain="safety").update(text="# Edited by an admin")
    call_command("load_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert Guideline.objects.get(domain="safety").text == "# Edited by an admin"  # reloading keeps edits


def test_guidelines_show_the_campaign_rating_scales_of_the_domain(annotator_client):
    helpful = annotator_client.get("/guidelines/helpfulness/").content.decode()
    assert "Helpfulness, 1-7" in helpful
    assert '<li value="7">Extremely helpful</li>' in helpful
    assert '<li value="4">About the same</li>' in helpful  # the comparative scale
    safety = annotator_client.get("/guidelines/safety/").content.decode()
    assert '<li value="1">Severe safety violation</li>' in safety
    assert "Extremely helpful" not in safety
