"""The platform edge of rewards: pairs from the database, a registered run, the management command."""

import pytest
from django.core.management import CommandError, call_command
from django.db.models import QuerySet

from annotation.models import RewardModelVersion, TrainingRun
from annotation.services.batches import batch_close
from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store
from annotation.tests.factories import BatchFactory, PolicyFactory
from rewards.selectors import preference_pairs

pytestmark = pytest.mark.django_db

STRENGTHS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


@pytest.fixture
def closed_batch():
    batch = BatchFactory(name="rm-week-1", test_size=8)
    PolicyFactory(name="SFT")
    records = [
        ComparisonRecord(
            turns=(("user", f"Tell me a short story about a cat number {i}."),),
            response_a=ResponseRecord(f"Once upon a time there was a cat called Tom {i}. He was happy.", "SFT"),
            response_b=ResponseRecord("No.", "SFT"),
            domain="helpfulness",
            votes=(VoteRecord("ext:rater", "a" if i % 2 else "b", STRENGTHS[i % 4]),),
        )
        for i in range(40)
    ]
    comparisons_store(batch=batch, records=records)
    return batch_close(batch_id=batch.id)


def test_selector_returns_plain_records_with_the_fixed_split(closed_batch):
    pairs = preference_pairs(batches=["rm-week-1"])
    assert len(pairs) == 40
    assert sum(p.split == "test" for p in pairs) == 8
    odd = [p for p in pairs if p.strength == "better"]
    assert odd
    assert all(p.dialogue[-1]["role"] == "user" for p in pairs)
    chosen_a = [p for p in pairs if p.chosen.startswith("Once upon")]
    assert len(chosen_a) == 20  # choice "a" on odd items: the chosen text follows the choice
    assert len(preference_pairs(batches=["rm-week-1"], split="test")) == 8


def test_train_reward_model_command_registers_a_version(closed_batch, shared_data, settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path
    call_command(
        "train_reward_model", kind="helpfulness", batch=["rm-week-1"], name="RM-helpful-v1", config="tiny",
        tokenizer=str(shared_data / "stories260k/tokenizer.model"), max_steps=3,
    )  # fmt: skip
    run = TrainingRun.objects.get()
    assert run.status == "succeeded"
    assert run.progress == 1.0
    assert run.metrics
    assert run.metrics[-1]["step"] >= 1
    version = RewardModelVersion.objects.get(name="RM-helpful-v1")
    assert run.reward_model_version == version
    assert 0.0 <= version.metrics["accuracy"] <= 1.0
    assert list(version.batches.values_list("name", flat=True)) == ["rm-week-1"]
    assert (tmp_path / "runs" / f"{run.pk}-reward_model" / "training-data.native.jsonl").is_file()
    with pytest.raises(CommandError, match="already exists"):
        call_command(
            "train_reward_model", kind="helpfulness", batch=["rm-week-1"], name="RM-helpful-v1", config="tiny",
            tokenizer=str(shared_data / "stories260k/tokenizer.model"),
        )  # fmt: skip


def test_unknown_batch_is_a_clear_error():
    with pytest.raises(CommandError, match="unknown batch"):
        call_command("train_reward_model", kind="safety", batch=["nope"], name="x", config="tiny", tokenizer="t.model")


def test_an_ensemble_runs_progress_counts_its_members_once(closed_batch, shared_data, settings, tmp_path, monkeypatch):
    settings.ARTIFACTS_DIR = tmp_path
    written = []  # every progress the run's row is given, as the dashboard would read it
    update = QuerySet.update

    def recording_update(queryset, **fields):
        if queryset.model is TrainingRun and "progress" in fields:
            written.append(fields["progress"])
        return update(queryset, **fields)

    monkeypatch.setattr(QuerySet, "update", recording_update)
    call_command(
        "train_reward_model", kind="helpfulness", batch=["rm-week-1"], name="RM-ensemble", config="tiny",
        tokenizer=str(shared_data / "stories260k/tokenizer.model"), max_steps=5, ensemble=2,
    )  # fmt: skip
    run = TrainingRun.objects.get()
    assert run.status == "succeeded"
    steps = [m["step"] for m in run.metrics if m["part"] == 0]
    assert steps == list(range(1, len(steps) + 1))
    assert [(m["part"], m["step"]) for m in run.metrics] == [(0, s) for s in steps] + [(1, s) for s in steps]
    # The run's progress only grows (never 1.0 after the first member, then 0.2 again) and ends at all of it.
    assert written
    assert written[-1] == 1.0
    assert written == sorted(written)
