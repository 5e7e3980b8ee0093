"""The researcher's cockpit for data: backlogs, batches created from an upload, closed, exported a click away."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from annotation.models import Batch, ComparisonTask, TrainingRun
from annotation.services.dialogues import prompt_create
from annotation.tests.factories import BatchFactory, PolicyFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db

HH = "".join(json.dumps({"chosen": f"\n\nHuman: question {i}\n\nAssistant: a kind answer {i}",
                         "rejected": f"\n\nHuman: question {i}\n\nAssistant: no"}) + "\n" for i in range(5))  # fmt: skip


def test_backlogs_count_the_work_waiting(researcher_client):
    batch = BatchFactory(name="wk", overlap=2)
    make_tasks(batch, 3)
    prompt_create(author=annotator("w"), text="Hello?", domain="helpfulness", batch=batch)
    page = researcher_client.get("/dashboard/work/").content.decode()
    assert '<dd id="awaiting">1</dd>' in page
    assert "Open places, helpfulness</dt><dd>6</dd>" in page  # 3 comparisons x 2 raters
    api = researcher_client.get("/api/v1/backlogs/").json()
    assert api["awaiting_responses"] == 1
    assert api["open_places"] == {"helpfulness": 6}


def test_a_batch_imported_from_an_upload_is_listed_exported_and_closed(researcher_client, settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path
    upload = SimpleUploadedFile("hh.jsonl", HH.encode())
    response = researcher_client.post("/dashboard/work/", {"source": "import", "name": "hh-week", "overlap": 1,
                                                           "test_size": 2, "format": "hh-rlhf", "domain": "safety",
                                                           "file": upload}, follow=True)  # fmt: skip
    assert response.status_code == 200
    assert "5 comparisons imported" in response.content.decode()
    batch = Batch.objects.get(name="hh-week")
    assert ComparisonTask.objects.filter(batch=batch).count() == 5
    page = researcher_client.get("/dashboard/work/").content.decode()
    link = "/api/v1/export/comparisons.jsonl?batch=hh-week&amp;format=trl"
    assert link in page
    export = researcher_client.get(link.replace("&amp;", "&"))
    assert export.status_code == 200
    rows = [json.loads(line) for line in b"".join(export.streaming_content).decode().splitlines()]
    assert len(rows) == 5
    assert {"prompt", "chosen", "rejected"} <= set(rows[0])
    response = researcher_client.post(f"/dashboard/batches/{batch.pk}/close/", follow=True)
    assert "closed: its test split is fixed" in response.content.decode()
    batch.refresh_from_db()
    assert batch.status == "closed"
    assert ComparisonTask.objects.filter(batch=batch, split="test").count() == 2


def test_a_bad_upload_is_refused_whole_and_names_the_line(researcher_client, settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path
    bad = HH + '{"chosen": 3}\n'
    response = researcher_client.post("/dashboard/work/", {"source": "import", "name": "bad", "overlap": 1,
                                                           "test_size": 0, "format": "hh-rlhf", "domain": "safety",
                                                           "file": SimpleUploadedFile("bad.jsonl", bad.encode())})  # fmt: skip
    assert response.status_code == 400
    assert "bad.jsonl: line 6, field &#x27;chosen&#x27;" in response.content.decode()
    assert not Batch.objects.filter(name="bad").exists()


def test_a_prompts_upload_queues_the_model_worker_for_a_new_batch(researcher_client, settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path
    PolicyFactory(name="SFT", is_current=True, checkpoint_uri="/x")
    prompts = SimpleUploadedFile("p.jsonl", b'{"prompt": "Hi"}\n')
    response = researcher_client.post("/dashboard/work/", {"source": "prompts", "name": "week-2", "overlap": 1,
                                                           "test_size": 0, "file": prompts}, follow=True)  # fmt: skip
    assert "opens batch week-2" in response.content.decode()
    run = TrainingRun.objects.get()
    assert run.kind == "generation"
    assert run.params["batch"] == "week-2"
    assert run.params["policy"] == "SFT"
    assert (tmp_path / "uploads").is_dir()
    assert open(run.params["prompts"]).read() == '{"prompt": "Hi"}\n'
    response = researcher_client.post("/dashboard/work/", {"source": "pending", "overlap": 1, "test_size": 0}, follow=True)
    assert TrainingRun.objects.filter(params__pending=True).count() == 1


def test_annotators_get_no_cockpit(annotator_client):
    assert annotator_client.get("/dashboard/work/").status_code == 403
    assert annotator_client.post("/dashboard/batches/1/close/").status_code == 403


def test_the_campaigns_page_lists_each_campaigns_items_by_state(researcher_client):
    from annotation.services.campaigns import campaign_create

    PolicyFactory(name="V2")
    campaign_create(name="imported", kind="rating", policy="V2", overlap=1, prompts=[
        {"dialogue": [{"role": "user", "content": f"q{i}"}], "response": f"a{i}"} for i in range(2)])  # fmt: skip
    campaign_create(name="sampled", kind="rating", policy="V2", overlap=1,
                    prompts=[{"dialogue": [{"role": "user", "content": "q"}]}])  # fmt: skip
    page = researcher_client.get("/dashboard/campaigns/").content.decode()
    assert "<td>0 / 2</td>" in page
    assert "<td>0 / 1 (1 awaiting responses)</td>" in page
