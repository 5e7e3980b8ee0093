"""The admin: choice labels in the list filters, a comparison's page with its texts and annotations."""

import pytest

from annotation.models import Annotation
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.tests.factories import annotator

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(client, db):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_superuser("boss", "boss@example.org", "pw")
    client.force_login(user)
    return client


def test_annotation_filters_show_labels_not_codes(admin_client_, tasks):
    user = annotator("ann1")
    held = assignment_claim_next(user=user)
    annotation_submit(user=user, task_id=held.task_id, choice="a", strength="significantly_better")
    html = admin_client_.get("/admin/annotation/annotation/").content.decode()
    for label in ("A is better", "Significantly better", "Negligibly better / unsure", "Chosen is safe, the other is not"):
        assert label in html
    assert "SIGNIFICANTLY_BETTER" not in html
    assert "CHOSEN_SAFE_OTHER_UNSAFE" not in html
    filtered = admin_client_.get("/admin/annotation/annotation/?strength=better").content.decode()
    assert "0 annotations" in filtered or "0 results" in filtered
    assert admin_client_.get("/admin/annotation/annotation/?strength=significantly_better").context["cl"].result_count == 1
    assert admin_client_.get("/admin/annotation/adjudication/").status_code == 200


def test_task_page_shows_the_responses_and_its_annotations_read_only(admin_client_, tasks):
    user = annotator("ann1")
    held = assignment_claim_next(user=user)
    annotation_submit(user=user, task_id=held.task_id, choice="b", strength="better", note="B-IS-CONCRETE")
    response = admin_client_.get(f"/admin/annotation/comparisontask/{held.task_id}/change/")
    html = response.content.decode()
    assert "answer A0" in html
    assert "answer B0" in html
    assert "helpfulness prompt 0" in html  # the context
    assert "B-IS-CONCRETE" in html
    assert "B is better" in html
    form = response.context["adminform"].form
    for name in ("status", "annotation_count", "required_annotations"):
        assert name not in form.fields  # read-only
    # A post cannot change the counts.
    task = tasks[0]
    admin_client_.post(f"/admin/annotation/comparisontask/{task.id}/change/", {"annotation_count": 0})
    task.refresh_from_db()
    assert task.annotation_count == Annotation.objects.filter(task=task).count() == 1
