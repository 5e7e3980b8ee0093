import json
from collections import Counter

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from annotation.importers import parse_file
from annotation.importers.common import ImportFormatError
from annotation.models import Annotation, Batch, ComparisonTask, Prompt, Role
from annotation.services.batches import batch_close

from .factories import BatchFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db


def test_hh_rlhf_file_parses_with_turns_and_a_hidden_side(shared_data):
    records, skipped = parse_file(
        "hh-rlhf", shared_data / "hh-rlhf-harmless/pairs.jsonl.gz", domain="safety", skip_invalid=True
    )
    assert len(records) + len(skipped) == 1800
    assert len(records) > 1750
    sides = {r.votes[0].choice for r in records}
    assert sides == {"a", "b"}  # the chosen reply is not always on one side
    multi = [r for r in records if len(r.turns) > 1]
    assert multi
    assert all(r.turns[-1][0] == "user" for r in records)
    assert all(r.risk_category == "uncategorized" for r in records)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("hh-rlhf", "hh-rlhf-harmless/pairs.jsonl.gz"), ("oasst", "oasst-trees/en_100_tree.jsonl"),
     ("pandalm", "pandalm/testset-v1.json")],
)
def test_parsing_reports_how_much_of_the_file_is_read(shared_data, fmt, name):
    """What the import command's bar shows: bytes of the file as stored (compressed for .gz), up to its size."""
    path = shared_data / name
    seen = []
    parse_file(fmt, path, domain="helpfulness", skip_invalid=True, progress=seen.append)
    assert seen[-1] == path.stat().st_size
    assert seen == sorted(seen)
    if fmt == "hh-rlhf":  # 1,800 lines: a report every 256 lines, then the end
        assert len(seen) == 1800 // 256 + 1


def test_hh_rlhf_strict_import_names_line_and_field(shared_data):
    with pytest.raises(ImportFormatError, match=r"line 1318, field 'rejected'"):
        parse_file("hh-rlhf", shared_data / "hh-rlhf-harmless/pairs.jsonl.gz", domain="safety")


def test_an_empty_final_reply_is_imported_as_an_empty_response_and_served_as_one(shared_data, tmp_path, client):
    # Line 65 of the shared harmless pairs: an empty answer preferred to one giving out a home address.
    import gzip

    with gzip.open(shared_data / "hh-rlhf-harmless/pairs.jsonl.gz", "rt") as f:
        line = [next(f) for _ in range(65)][-1]
    path = tmp_path / "line65.jsonl"
    path.write_text(line)
    call_command("import_preferences", str(path), format="hh-rlhf", domain="helpfulness", batch="hh", overlap=2)
    task = ComparisonTask.objects.get()
    empty = task.response_a if task.response_a.text == "" else task.response_b
    assert empty.text == ""
    chosen = Annotation.objects.get(task=task).choice
    assert (task.response_a if chosen == "a" else task.response_b) == empty  # the empty answer was preferred
    # An empty response posted by a model worker is stored and served as it is (the page shows a placeholder).
    researcher = annotator("lead", role=Role.RESEARCHER)
    api = APIClient()
    api.force_authenticate(researcher)
    BatchFactory(name="live")
    item = {"prompt": "Tell me a secret", "domain": "helpfulness",
            "responses": [{"text": "", "policy_version": "hh-rlhf:anthropic"},
                          {"text": "No.", "policy_version": "hh-rlhf:anthropic"}]}  # fmt: skip
    assert api.post("/api/v1/comparisons/import/", {"batch": "live", "items": [item]}, format="json").status_code == 201
    client.force_login(annotator("ann"))
    served = client.post("/annotate/next/", content_type="application/json").json()["task"]
    assert (served["response_a"], served["response_b"]) == ("", "No.")


GOOD_LINE = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello there",
                        "rejected": "\n\nHuman: hi\n\nAssistant: go away"}) + "\n"  # fmt: skip


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # The gzip stream ends mid-way (a download cut short).
        ("cut.jsonl.gz", lambda: _gz(GOOD_LINE.encode() * 400)[:-40], r"line \d+: the file ends in the middle of its compressed data"),
        ("plain.jsonl.gz", lambda: GOOD_LINE.encode(), r"line 1: the file is not valid gzip data"),
        ("latin.jsonl", lambda: GOOD_LINE.encode() + b'{"chosen": "caf\xff"}\n', r"line 2: not UTF-8 text \(byte 0xff"),
        # A surrogate encoded as bytes (CESU-style): not UTF-8 either.
        ("cesu.jsonl", lambda: GOOD_LINE.encode() * 2 + b'{"chosen": "\xed\xb2\x80"}\n', r"line 3: not UTF-8 text"),
    ],
)
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_an_unreadable_file_is_a_one_line_error_even_with_skip_invalid(tmp_path, name, content, message, skip_invalid):
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(CommandError, match=message) as e:
        call_command("import_preferences", str(path), format="hh-rlhf", domain="helpfulness", batch="b1",
                     skip_invalid=skip_invalid)  # fmt: skip
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)
    assert not Batch.objects.exists()
    assert not ComparisonTask.objects.exists()


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        ("\x00", "chosen", "contains a NUL character"),
        ("\udc80", "rejected", "contains a lone surrogate"),
    ],
)
def test_a_nul_or_lone_surrogate_names_line_and_field_and_stores_nothing(tmp_path, bad, field, problem):
    record = json.loads(GOOD_LINE)
    record[field] = record[field].replace("there" if field == "chosen" else "away", f"x{bad}y")
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_LINE + json.dumps(record) + "\n")  # json.dumps writes the escapes, as a file holds them
    with pytest.raises(CommandError, match=rf"line 2, field '{field}': {field} {problem}"):
        call_command("import_preferences", str(path), format="hh-rlhf", domain="helpfulness", batch="b1")
    assert not Batch.objects.exists()
    assert not ComparisonTask.objects.exists()
    # With --skip-invalid the bad record is left out and the rest stored.
    call_command("import_preferences", str(path), format="hh-rlhf", domain="helpfulness", batch="b1", skip_invalid=True)
    assert ComparisonTask.objects.count() == 1


@pytest.mark.parametrize("overlap", [0, -3, 40_000])
def test_a_bad_overlap_is_refused_before_anything_is_read(tmp_path, overlap):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_LINE)
    with pytest.raises(CommandError, match=r"--overlap must be a whole number from 1 to 32767"):
        call_command("import_preferences", str(path), format="hh-rlhf", domain="helpfulness", batch="b1",
                     overlap=overlap)  # fmt: skip
    assert not Batch.objects.exists()


def test_a_failed_store_leaves_no_empty_batch_behind(tmp_path, monkeypatch):
    from annotation.management.commands import import_preferences
    from annotation.services.errors import Conflict

    def refuse(**kwargs):
        assert Batch.objects.filter(name="b1").exists()  # created in the store's transaction...
        raise Conflict("batch 'b1' is closed")

    monkeypatch.setattr(import_preferences, "comparisons_store", refuse)
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_LINE)
    with pytest.raises(CommandError, match="nothing was imported"):
        call_command("import_preferences", str(path), format="hh-rlhf", domain="helpfulness", batch="b1")
    assert not Batch.objects.exists()  # ...and gone with it


def test_identical_responses_in_a_file_are_refused(tmp_path):
    same = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: yes"})
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_LINE + same + "\n")
    with pytest.raises(CommandError, match="line 2, field 'response_b': the two responses are identical"):
        call_command("import_preferences", str(path), format="hh-rlhf", domain="helpfulness", batch="b1")
    assert not Batch.objects.exists()


def test_importing_a_file_twice_stores_it_once(shared_data, capsys):
    path = str(shared_data / "oasst-trees/en_100_tree.jsonl")
    call_command("import_preferences", path, format="oasst", domain="helpfulness", batch="oasst")
    counts = (ComparisonTask.objects.count(), Annotation.objects.count(), Prompt.objects.count())
    assert counts[0] == 754
    call_command("import_preferences", path, format="oasst", domain="helpfulness", batch="oasst")
    assert (ComparisonTask.objects.count(), Annotation.objects.count(), Prompt.objects.count()) == counts
    assert "imported 0 comparisons with 0 annotations" in capsys.readouterr().out
    call_command("import_preferences", path, format="oasst", domain="helpfulness", batch="another")
    assert ComparisonTask.objects.count() == 2 * 754  # another batch is another collection


def test_a_store_in_chunks_reports_progress_and_stores_what_one_round_does(shared_data, monkeypatch):
    from annotation.services import imports

    records, _ = parse_file("oasst", shared_data / "oasst-trees/en_100_tree.jsonl", domain="helpfulness")
    monkeypatch.setattr(imports, "STORE_CHUNK", 7)
    seen: list[int] = []
    batch = BatchFactory(name="chunks")
    first = imports.comparisons_store(batch=batch, records=records[:30], create_external_policies=True)
    stored = imports.comparisons_store(batch=batch, records=records[20:60], create_external_policies=True,
                                       progress=seen.append)  # fmt: skip
    assert seen == [10, 7, 7, 7, 7, 2]  # the 10 stored already first, then the new ones 7 at a time
    assert stored.tasks[:10] == first.tasks[20:30]
    assert (stored.created, stored.existing) == (30, 10)
    assert ComparisonTask.objects.filter(batch=batch).count() == 60
    assert Annotation.objects.filter(task__batch=batch).count() == sum(len(r.votes) for r in records[:60])


def test_import_then_export_round_trips_through_native(shared_data, tmp_path):
    call_command(
        "import_preferences", str(shared_data / "oasst-trees/en_100_tree.jsonl"),
        format="oasst", domain="helpfulness", batch="oasst",
    )  # fmt: skip
    out = tmp_path / "native.jsonl"
    call_command("export_preferences", format="native", batch="oasst", out=str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 754
    call_command("import_preferences", str(out), format="native", domain="helpfulness", batch="again")
    again = tmp_path / "again.jsonl"
    call_command("export_preferences", format="native", batch="again", out=str(again))
    rows2 = [json.loads(line) for line in again.read_text().splitlines()]
    key = ("dialogue", "chosen", "rejected", "strength", "domain")
    assert sorted(json.dumps([r[k] for k in key]) for r in rows) == sorted(
        json.dumps([r[k] for k in key]) for r in rows2
    )


@pytest.fixture
def labelled_batch():
    """A batch of 4 tasks, overlap 3; task 1's annotators split 2:1, one gold task."""
    batch = BatchFactory(name="wk", overlap=3, test_size=1, gold_rate=1.0)
    tasks = make_tasks(batch, 4)
    make_tasks(batch, 1, gold=True)
    from annotation.services.assignment import annotation_submit, assignment_claim_next

    users = [annotator(f"u{i}") for i in range(3)]
    for n, user in enumerate(users):
        while (lease := assignment_claim_next(user=user)) is not None:
            choice = "b" if (lease.task_id == tasks[0].id and n == 2) else "a"
            strength = ["significantly_better", "better", "slightly_better"][n]
            annotation_submit(
                user=user, task_id=lease.task_id, choice=choice, strength=strength, time_on_task_ms=8000
            )
    return batch, tasks


def export(params: str) -> list[dict]:
    client = APIClient()
    client.force_authenticate(annotator("exporter", role=Role.RESEARCHER))
    response = client.get(f"/api/v1/export/comparisons.jsonl?{params}")
    assert response.status_code == 200, response.content
    assert response.streaming
    return [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]


def test_export_native_rows_per_annotation_with_pseudonyms(labelled_batch):
    rows = export("batch=wk")
    assert len(rows) == 12  # gold excluded by default
    row = rows[0]
    assert row["annotator"].startswith("ann-")
    assert "u0" not in json.dumps(rows)  # pseudonymous
    assert row["response_a"]["policy_version"] == "SFT"
    assert row["dialogue"][-1]["role"] == "user"
    assert row["chosen"] == (row["response_a"] if row["choice"] == "a" else row["response_b"])["text"]
    assert len(export("batch=wk&include_gold=true")) == 15


def test_export_trl_margins_follow_table_27(labelled_batch):
    small = export("batch=wk&format=trl")
    large = export("batch=wk&format=trl&margin=large")
    assert sorted({r["margin"] for r in small}) == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert {r["margin"] for r in large} == {3.0, 2.0, 1.0}
    assert small[0]["chosen"][0]["role"] == "assistant"
    assert isinstance(small[0]["prompt"], list)


def test_export_hh_rlhf_transcripts(labelled_batch):
    row = export("batch=wk&format=hh-rlhf")[0]
    assert row["chosen"].startswith("\n\nHuman: ")
    assert "\n\nAssistant: " in row["rejected"]


def test_export_majority_aggregates_per_task(labelled_batch):
    batch, tasks = labelled_batch
    rows = export("batch=wk&aggregate=true")
    assert len(rows) == 4
    split_task = next(r for r in rows if r["task_id"] == tasks[0].id)
    assert split_task["choice"] == "a"
    assert split_task["n_annotations"] == 3
    # Majority voters gave significantly_better and better: the lower median is "better".
    assert split_task["strength"] == "better"


@pytest.mark.parametrize("task_chunk", [700, 1, 3])  # pages of whole tasks: one page, one task a page, 3 + 1
def test_export_aggregate_takes_the_adjudication_over_the_vote(labelled_batch, monkeypatch, task_chunk):
    from annotation.services import exports
    from annotation.services.review import adjudication_create

    monkeypatch.setattr(exports, "TASK_CHUNK", task_chunk)
    batch, tasks = labelled_batch
    reviewer = annotator("rev", role=Role.REVIEWER)
    adjudication_create(
        reviewer=reviewer, reviewer_role=Role.REVIEWER, task_id=tasks[0].id, choice="b",
        strength="negligibly_better", reason="B answers the question; A only restates it",
    )  # fmt: skip
    rows = export("batch=wk&aggregate=true")
    assert [r["task_id"] for r in rows] == [t.id for t in tasks]
    decided = rows[0]
    assert (decided["choice"], decided["strength"], decided["annotator"]) == ("b", "negligibly_better", "adjudicated")
    assert decided["chosen"] == decided["response_b"]["text"]
    assert (decided["annotation_id"], decided["n_annotations"]) == (None, 3)
    assert {(r["choice"], r["annotator"], r["n_annotations"]) for r in rows[1:]} == {("a", "majority", 3)}
    trl = export("batch=wk&aggregate=true&format=trl")
    assert trl[0]["chosen"][0]["content"] == tasks[0].response_b.text
    assert trl[0]["margin"] == 0.0  # Table 27: negligibly better has no margin


def test_export_count_gives_the_progress_bar_its_total(labelled_batch, tmp_path):
    from annotation.services.exports import ExportFilters, comparisons_export_count

    assert comparisons_export_count(filters=ExportFilters(batch="wk")) == len(export("batch=wk")) == 12
    assert comparisons_export_count(filters=ExportFilters(batch="wk", include_gold=True)) == 15
    assert comparisons_export_count(filters=ExportFilters(batch="wk"), aggregate=True) == 4
    out = tmp_path / "wk.jsonl"
    call_command("export_preferences", batch="wk", aggregate=True, out=str(out))
    assert len(out.read_text().splitlines()) == 4


def test_export_split_filter_after_close(labelled_batch):
    batch, _ = labelled_batch
    assert export("batch=wk&split=test") == []
    batch_close(batch_id=batch.id)
    assert len({r["task_id"] for r in export("batch=wk&split=test")}) == 1
    assert len({r["task_id"] for r in export("batch=wk&split=train")}) == 3


@pytest.mark.parametrize(
    "params", ["format=xml", "margin=huge", "split=dev", "created_after=yesterday", "aggregate=maybe"]
)
def test_export_bad_parameters_are_400(params, labelled_batch):
    client = APIClient()
    client.force_authenticate(annotator("exporter2", role=Role.RESEARCHER))
    response = client.get(f"/api/v1/export/comparisons.jsonl?{params}")
    assert response.status_code == 400
    assert response.json()["detail"]


def test_export_date_filters(labelled_batch):
    assert len(export("batch=wk&created_after=2000-01-01")) == 12
    assert export("batch=wk&created_before=2000-01-01") == []
    assert Annotation.objects.count() == 15


@pytest.mark.parametrize("fmt", ["native", "trl", "hh-rlhf"])
@pytest.mark.parametrize("margin", ["small", "large"])
def test_postgresql_renderer_equals_the_python_renderer(labelled_batch, fmt, margin):
    from django.db import connection

    from annotation.services.exports import ExportFilters, comparisons_export_lines

    if connection.vendor != "postgresql":
        pytest.skip("the SQL renderer is PostgreSQL's (CI runs on PostgreSQL)")
    for filters in (ExportFilters(), ExportFilters(batch="wk", include_gold=True), ExportFilters(domain="safety")):
        def rows(python: bool, filters=filters):
            text = "".join(comparisons_export_lines(filters=filters, fmt=fmt, margin=margin, python_renderer=python))
            return [json.loads(line) for line in text.splitlines()]

        in_sql, in_python = rows(False), rows(True)
        assert in_sql == in_python
    assert len(in_python) == 0  # the last filter (safety) matches nothing here


@pytest.mark.parametrize("fmt", ["native", "trl", "hh-rlhf"])
def test_postgresql_renderer_equals_the_python_renderer_per_task(fmt, monkeypatch):
    """Majorities with every kind of tie (even splits, strengths, safety labels) and adjudications."""
    import random

    from django.db import connection

    from annotation.services import exports_sql
    from annotation.services.exports import ExportFilters, comparisons_export_lines
    from annotation.services.imports import VoteRecord
    from annotation.services.review import adjudication_create

    if connection.vendor != "postgresql":
        pytest.skip("the SQL renderer is PostgreSQL's (CI runs on PostgreSQL)")
    rng = random.Random(7)
    strengths = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    labels = ["chosen_safe_other_unsafe", "both_safe", "both_unsafe"]
    batch = BatchFactory(name="ties")
    for domain in ("helpfulness", "safety"):
        for n_votes in (1, 2, 3, 4, 5):
            votes = [
                [VoteRecord(f"ext:{k}", rng.choice("ab"), rng.choice(strengths),
                            rng.choice(labels) if domain == "safety" else "") for k in range(n_votes)]
                for _ in range(12)
            ]  # fmt: skip
            tasks = [task for v in votes for task in make_tasks(batch, 1, domain=domain, votes=v)]
            reviewer = annotator(role=Role.REVIEWER)
            for task in tasks[:2]:
                adjudication_create(reviewer=reviewer, reviewer_role=Role.REVIEWER, task_id=task.id, choice="b",
                                    strength="better", safety_label="both_safe" if domain == "safety" else "",
                                    reason="checked")  # fmt: skip
    monkeypatch.setattr(exports_sql, "PAGE", 7)  # many pages
    from datetime import UTC, datetime

    some = Annotation.objects.order_by("id")[40].created_at  # the later part of the batch
    for filters in (ExportFilters(), ExportFilters(domain="safety", created_before=datetime(2100, 1, 1, tzinfo=UTC)),
                    ExportFilters(created_after=some), ExportFilters(batch="nope")):  # fmt: skip
        sql, python = (
            [json.loads(line) for line in "".join(comparisons_export_lines(
                filters=filters, fmt=fmt, aggregate=True, python_renderer=p)).splitlines()]
            for p in (False, True)
        )  # fmt: skip
        assert sql == python
    assert len(python) == 0
    everything = "".join(comparisons_export_lines(filters=ExportFilters(), fmt="native", aggregate=True))
    kinds = Counter(json.loads(line)["annotator"] for line in everything.splitlines())
    assert kinds["adjudicated"] == 20
    assert 60 < kinds["majority"] < 100  # even splits left out


def test_migration_0003_keys_the_tasks_stored_before_it(shared_data):
    import importlib

    from django.apps import apps

    backfill = importlib.import_module("annotation.migrations.0003_task_content_key").backfill_content_keys
    records, _ = parse_file("oasst", shared_data / "oasst-trees/en_100_tree.jsonl", domain="helpfulness")
    batch = BatchFactory(name="old")
    from annotation.services.imports import comparisons_store

    first = comparisons_store(batch=batch, records=records[:50], create_external_policies=True).tasks
    ComparisonTask.objects.update(content_key="")  # as before the migration
    comparisons_store(batch=batch, records=records[:10], create_external_policies=True)  # imported twice, then
    ComparisonTask.objects.update(content_key="")
    backfill(apps, None)
    keyed = dict(ComparisonTask.objects.exclude(content_key="").values_list("id", "content_key"))
    assert keyed == {t.id: r.content_key() for t, r in zip(first, records, strict=False)}  # the first of a pair
    assert comparisons_store(batch=batch, records=records[:60], create_external_policies=True).created == 10


def test_a_pair_lands_on_the_same_sides_wherever_it_is_in_the_file_and_a_resorted_file_adds_nothing(tmp_path):
    pairs = [
        {"chosen": f"\n\nHuman: question {i}\n\nAssistant: a careful answer {i}",
         "rejected": f"\n\nHuman: question {i}\n\nAssistant: no {i}"}
        for i in range(40)
    ]  # fmt: skip
    forward, backward = tmp_path / "forward.jsonl", tmp_path / "backward.jsonl"
    forward.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    backward.write_text("".join(json.dumps(p) + "\n" for p in pairs[::-1]))
    a, _ = parse_file("hh-rlhf", forward, domain="safety")
    b, _ = parse_file("hh-rlhf", backward, domain="safety")
    assert [r.content_key() for r in a] == [r.content_key() for r in b[::-1]]
    assert {r.votes[0].choice for r in a} == {"a", "b"}  # still no position signal
    call_command("import_preferences", str(forward), format="hh-rlhf", domain="safety", batch="hh")
    call_command("import_preferences", str(backward), format="hh-rlhf", domain="safety", batch="hh")
    assert ComparisonTask.objects.count() == Annotation.objects.count() == 40


def test_repeated_records_in_one_file_become_one_task_with_each_annotators_vote(tmp_path):
    row = {"dialogue": [{"role": "user", "content": "Name a prime."}],
           "response_a": {"text": "7", "policy_version": "SFT"}, "response_b": {"text": "8", "policy_version": "SFT"},
           "choice": "a", "strength": "better"}  # fmt: skip
    path = tmp_path / "native.jsonl"
    rows = [{**row, "task_id": 1, "annotator": "x"}, {**row, "task_id": 2, "annotator": "y"},
            {**row, "task_id": 3, "annotator": "x"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    call_command("import_preferences", str(path), format="native", domain="helpfulness", batch="n")
    task = ComparisonTask.objects.get()
    assert sorted(Annotation.objects.values_list("annotator__username", flat=True)) == ["native:x", "native:y"]
    assert (task.annotation_count, task.required_annotations) == (2, 2)


def test_an_imported_time_on_task_out_of_range_names_the_line_and_field(tmp_path):
    row = {"dialogue": [{"role": "user", "content": "Hi"}], "response_a": {"text": "Hello", "policy_version": "SFT"},
           "response_b": {"text": "Go away", "policy_version": "SFT"}, "choice": "a", "annotator": "x"}  # fmt: skip
    path = tmp_path / "native.jsonl"
    for bad in (3_000_000_000, -5):
        path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "task_id": 9, "time_on_task_ms": bad}) + "\n")
        with pytest.raises(CommandError, match=r"line 2.*time_on_task_ms"):
            call_command("import_preferences", str(path), format="native", domain="helpfulness", batch="t")
    assert not ComparisonTask.objects.exists()
    assert not Batch.objects.exists()

