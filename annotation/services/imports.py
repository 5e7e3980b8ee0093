"""Bulk storage of comparisons: model responses posted by workers, and preference files imported.

Everything arrives as `ComparisonRecord`s (parsed and validated before anything is written) and is
stored in one transaction with bulk inserts: an import is all or nothing. A comparison already in the
batch (same context, responses, policies, domain and gold answer) is not stored again: importing a file
twice, or a model worker posting the same items again after a lost response, changes nothing.
"""

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from annotation.models import (
    Annotation,
    AnnotatorProfile,
    Assignment,
    AssignmentStatus,
    Batch,
    BatchStatus,
    ComparisonTask,
    Dialogue,
    PolicyVersion,
    Prompt,
    Response,
    TaskSlot,
    TaskStatus,
    Turn,
)
from annotation.models.registry import PolicyKind
from annotation.scales import SafetyLabel, Strength
from annotation.validation import (
    MAX_NOTE_CHARS,
    MAX_RESPONSE_CHARS,
    check_json_object,
    check_text,
    check_time_on_task_ms,
)

from .dialogues import check_domain_and_risk, slots_for
from .errors import BatchClosed, InvalidInput

STORE_CHUNK = 5000  # records inserted a round (one transaction in all)
STRENGTHS = [s.value for s in Strength]
SAFETY_LABELS = [s.value for s in SafetyLabel]


@dataclass(frozen=True)
class ResponseRecord:
    text: str
    policy_version: str
    sampling: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VoteRecord:
    """An imported annotation by a named external annotator."""

    annotator: str
    choice: str
    strength: str = ""
    safety_label: str = ""
    note: str = ""
    time_on_task_ms: int | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class ComparisonRecord:
    """A dialogue context (alternating turns, ending with the user's) and two responses to compare."""

    turns: tuple[tuple[str, str], ...]  # (role, text)
    response_a: ResponseRecord
    response_b: ResponseRecord
    domain: str
    risk_category: str = ""
    gold_choice: str = ""
    votes: tuple[VoteRecord, ...] = ()
    source: str = "api"
    origin: str = ""  # where it came from, for error messages: "line 12", "items[3]"

    def content_key(self) -> str:
        return comparison_content_key(
            domain=self.domain,
            turns=self.turns,
            response_a=(self.response_a.text, self.response_a.policy_version),
            response_b=(self.response_b.text, self.response_b.policy_version),
            gold_choice=self.gold_choice,
        )


def comparison_content_key(
    *, domain: str, turns: Sequence[tuple[str, str]], response_a: tuple[str, str], response_b: tuple[str, str],
    gold_choice: str,
) -> str:  # fmt: skip
    """What identifies a comparison within a batch: the context's (role, text) turns, each side's (text,
    policy name) in its position, the domain and the gold answer; not the votes, the risk category, the
    source or the sampling settings. The same two responses in swapped positions are another comparison."""
    content = [domain, [list(t) for t in turns], list(response_a), list(response_b), gold_choice]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class StoredComparisons:
    """The task of each record, in order; `created` of them are new (with `annotations` imported votes), the
    rest were in the batch already."""

    tasks: list[ComparisonTask]
    created: int
    annotations: int

    @property
    def existing(self) -> int:
        return len(self.tasks) - self.created


def check_record(r: ComparisonRecord) -> None:
    """Raise InvalidInput, naming the record's origin and field, unless the record can be stored."""
    where = r.origin or "record"
    check_turns(r.turns, where)
    try:
        check_domain_and_risk(r.domain, r.risk_category)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e.message}", field=e.field) from None
    for name, resp in (("response_a", r.response_a), ("response_b", r.response_b)):
        # An empty response is real data (a model that stops at once; HH-RLHF's empty answers), kept as it is.
        _checked(check_text, resp.text, where, field=name, max_length=MAX_RESPONSE_CHARS)
        if not resp.policy_version:
            raise InvalidInput(f"{where}: {name} needs a policy_version", field="policy_version")
        _checked(check_text, resp.policy_version, where, field="policy_version", max_length=100)
        _checked(check_json_object, resp.sampling, where, field="sampling")
    if r.response_a.text == r.response_b.text:
        raise InvalidInput(
            f"{where}: the two responses are identical; a comparison needs two different responses",
            field="response_b",
        )
    if r.gold_choice not in ("", "a", "b"):
        raise InvalidInput(f"{where}: gold_choice must be 'a' or 'b'", field="gold_choice")
    if r.gold_choice and r.votes:
        raise InvalidInput(f"{where}: a gold task cannot carry imported annotations", field="gold_choice")
    seen = set()
    for v in r.votes:
        _checked(check_text, v.annotator, where, field="annotator", max_length=150)
        _checked(check_text, v.note, where, field="note", max_length=MAX_NOTE_CHARS)
        if v.annotator in seen:
            raise InvalidInput(f"{where}: annotator {v.annotator!r} appears twice", field="annotator")
        seen.add(v.annotator)
        if v.choice not in ("a", "b"):
            raise InvalidInput(f"{where}: choice must be 'a' or 'b', got {v.choice!r}", field="choice")
        if v.strength not in ("", *STRENGTHS):
            raise InvalidInput(f"{where}: strength must be one of {STRENGTHS}, got {v.strength!r}", field="strength")
        if v.safety_label not in ("", *SAFETY_LABELS):
            raise InvalidInput(
                f"{where}: safety_label must be one of {SAFETY_LABELS}, got {v.safety_label!r}", field="safety_label"
            )
        _checked(check_time_on_task_ms, v.time_on_task_ms, where)


def _checked(check, value, where: str, **kwargs):
    """An annotation.validation check whose refusal names the record's origin."""
    try:
        return check(value, **kwargs)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e.message}", field=e.field) from None


def check_turns(turns: Sequence[tuple[str, str]], where: str) -> None:
    """Raise InvalidInput unless the turns alternate user/assistant, start and end with the user."""
    if not turns:
        raise InvalidInput(f"{where}: the dialogue is empty", field="dialogue")
    for i, (role, text) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise InvalidInput(f"{where}: turn {i} must be a {expected} turn, got {role!r}", field="dialogue")
        _checked(check_text, text, where, field=f"turn {i}", max_length=MAX_RESPONSE_CHARS)
        if not text or not text.strip():
            raise InvalidInput(f"{where}: turn {i} is empty", field="dialogue")
    if len(turns) % 2 == 0:
        raise InvalidInput(f"{where}: the dialogue must end with a user turn", field="dialogue")


def policies_resolve(names: Iterable[str], *, create_external: bool) -> dict[str, PolicyVersion]:
    """Look up policy versions by name; imports may register unknown names as external policies."""
    names = set(names)
    found = {p.name: p for p in PolicyVersion.objects.filter(name__in=names)}
    missing = names - found.keys()
    if missing and not create_external:
        raise InvalidInput(
            f"unknown policy_version {sorted(missing)}; register it first (POST /api/v1/policies/)",
            field="policy_version",
        )
    for name in sorted(missing):
        found[name] = PolicyVersion.objects.create(name=name, kind=PolicyKind.EXTERNAL)
    return found


def _external_annotators(names: set[str]) -> dict[str, object]:
    """Inactive accounts standing for the annotators of an imported data set."""
    user_model = get_user_model()
    existing = {u.username: u for u in user_model.objects.filter(username__in=names)}
    new = [user_model(username=n, is_active=False) for n in sorted(names - existing.keys())]
    for user in new:
        user.set_unusable_password()
    created = user_model.objects.bulk_create(new)
    AnnotatorProfile.objects.bulk_create(
        [AnnotatorProfile(user=u, skill_helpfulness=True, skill_safety=True) for u in created]
    )
    existing.update({u.username: u for u in created})
    return existing


@transaction.atomic
def comparisons_store(
    *,
    batch: Batch,
    records: Sequence[ComparisonRecord],
    create_external_policies: bool = False,
    author=None,
    progress: Callable[[int], None] | None = None,
) -> StoredComparisons:
    """Store records as comparison tasks of `batch` (with their imported annotations); all or nothing.

    A comparison is stored once per batch (see `comparison_content_key`): a record whose comparison the
    batch holds already gets the existing task, and its votes are not stored again; records repeated
    within the call become one task carrying the votes of every distinct annotator among them. The batch
    row is locked, so two imports into one batch cannot both store the same comparison (and the database
    holds the key unique per batch). `progress` is called with the number of records dealt with, chunk by
    chunk (the whole call is still one transaction).
    """
    for r in records:
        check_record(r)
    batch = Batch.objects.select_for_update(no_key=True).get(pk=batch.pk)
    keys = [r.content_key() for r in records]
    existing: dict[str, ComparisonTask] = {}
    for i in range(0, len(keys), STORE_CHUNK):
        for task in ComparisonTask.objects.filter(batch=batch, content_key__in=keys[i : i + STORE_CHUNK]):
            existing[task.content_key] = task
    first_of: dict[str, int] = {}  # key -> index of its first record, for comparisons new to the batch
    votes: dict[int, list[VoteRecord]] = {}
    for i, key in enumerate(keys):
        if key in existing:
            continue
        if key not in first_of:
            first_of[key] = i
            votes[i] = list(records[i].votes)
            continue
        merged = votes[first_of[key]]
        merged.extend(v for v in records[i].votes if v.annotator not in {m.annotator for m in merged})
    if first_of and batch.status != BatchStatus.OPEN:
        # A retry whose comparisons are all stored already still gets its tasks back from a closed batch.
        raise BatchClosed(f"batch {batch.name!r} is closed; import into an open batch")
    fresh = list(first_of.values())
    new_records = [replace(records[i], votes=tuple(votes[i])) for i in fresh]
    if progress is not None:
        progress(len(records) - len(fresh))  # those already stored, or repeated in this call
    new_tasks: list[ComparisonTask] = []
    for start in range(0, len(fresh), STORE_CHUNK):
        chunk = slice(start, start + STORE_CHUNK)
        new_tasks += _tasks_create(batch, new_records[chunk], [keys[i] for i in fresh[chunk]], create_external_policies, author)  # fmt: skip
        if progress is not None:
            progress(len(new_records[chunk]))
    created = dict(zip(fresh, new_tasks, strict=True))
    return StoredComparisons(
        tasks=[existing[k] if k in existing else created[first_of[k]] for k in keys],
        created=len(fresh),
        annotations=sum(len(r.votes) for r in new_records),
    )


def _tasks_create(
    batch: Batch, records: list[ComparisonRecord], keys: list[str], create_external_policies: bool, author
) -> list[ComparisonTask]:
    """Bulk-insert prompts, dialogues, turns, responses, tasks with their slots, and imported annotations."""
    if not records:
        return []
    policies = policies_resolve(
        {r.response_a.policy_version for r in records} | {r.response_b.policy_version for r in records},
        create_external=create_external_policies,
    )
    annotators = _external_annotators({v.annotator for r in records for v in r.votes})
    now = timezone.now()

    prompts = Prompt.objects.bulk_create(
        [
            Prompt(text=r.turns[0][1], domain=r.domain, risk_category=r.risk_category, author=author, source=r.source)
            for r in records
        ]
    )
    dialogues = Dialogue.objects.bulk_create([Dialogue(prompt=p) for p in prompts])
    Turn.objects.bulk_create(
        [
            Turn(dialogue=d, position=i, role=role, text=text)
            for r, d in zip(records, dialogues, strict=True)
            for i, (role, text) in enumerate(r.turns)
        ],
        batch_size=5000,
    )
    responses = Response.objects.bulk_create(
        [
            Response(
                dialogue=d,
                context_length=len(r.turns),
                text=resp.text,
                policy_version=policies[resp.policy_version],
                sampling=resp.sampling,
            )
            for r, d in zip(records, dialogues, strict=True)
            for resp in (r.response_a, r.response_b)
        ],
        batch_size=5000,
    )
    tasks = ComparisonTask.objects.bulk_create(
        [
            ComparisonTask(
                batch=batch,
                dialogue=d,
                context_length=len(r.turns),
                domain=r.domain,
                response_a=responses[2 * i],
                response_b=responses[2 * i + 1],
                status=TaskStatus.COMPLETE if r.votes else TaskStatus.OPEN,
                required_annotations=len(r.votes) or batch.overlap,
                annotation_count=len(r.votes),
                is_gold=bool(r.gold_choice),
                gold_choice=r.gold_choice,
                content_key=keys[i],
            )
            for i, (r, d) in enumerate(zip(records, dialogues, strict=True))
        ],
        batch_size=5000,
    )
    TaskSlot.objects.bulk_create(
        [slot for t, r in zip(tasks, records, strict=True) if not r.votes for slot in slots_for(t)], batch_size=5000
    )
    voted = [(t, v) for t, r in zip(tasks, records, strict=True) for v in r.votes]
    if voted:
        assignments = Assignment.objects.bulk_create(
            [
                Assignment(
                    task=t,
                    annotator=annotators[v.annotator],
                    status=AssignmentStatus.SUBMITTED,
                    leased_at=now,
                    expires_at=now + timezone.timedelta(seconds=1),
                    finished_at=now,
                )
                for t, v in voted
            ],
            batch_size=5000,
        )
        Annotation.objects.bulk_create(
            [
                Annotation(
                    task=t,
                    annotator=annotators[v.annotator],
                    assignment=a,
                    choice=v.choice,
                    strength=v.strength,
                    safety_label=v.safety_label,
                    note=v.note,
                    time_on_task_ms=v.time_on_task_ms,
                )
                for (t, v), a in zip(voted, assignments, strict=True)
            ],
            batch_size=5000,
        )
    return tasks
