"""Prompts, dialogues and the responses that model workers attach to them."""

from django.db import transaction

from annotation.models import (
    Annotation,
    Batch,
    BatchStatus,
    ComparisonTask,
    Dialogue,
    PolicyVersion,
    Prompt,
    Response,
    RiskCategory,
    TaskSlot,
    TaskStatus,
    Turn,
    TurnRole,
)
from annotation.validation import MAX_MESSAGE_CHARS, check_text

from .errors import BatchClosed, Conflict, InvalidInput, NotFound
from .runs import fill_responses_requested


def check_domain_and_risk(domain: str, risk_category: str) -> str:
    """Validate a domain / risk category pair and return the risk category to store."""
    if domain not in ("helpfulness", "safety"):
        raise InvalidInput(f"domain must be 'helpfulness' or 'safety', got {domain!r}", field="domain")
    risk_category = risk_category or ""
    if domain == "safety":
        if not risk_category:
            raise InvalidInput(
                f"safety prompts need a risk_category, one of {RiskCategory.values}", field="risk_category"
            )
        if risk_category not in RiskCategory.values:
            raise InvalidInput(
                f"risk_category must be one of {RiskCategory.values}, got {risk_category!r}", field="risk_category"
            )
    elif risk_category:
        raise InvalidInput("only safety prompts carry a risk_category", field="risk_category")
    return risk_category


def batch_current_open() -> Batch:
    batch = Batch.objects.filter(status=BatchStatus.OPEN).order_by("-created_at", "-id").first()
    if batch is None:
        raise Conflict("there is no open batch to add work to; a researcher must open one")
    return batch


@transaction.atomic
def prompt_create(
    *, author, text: str, domain: str, risk_category: str = "", batch: Batch | None = None, source: str = "ui"
) -> ComparisonTask:
    """An annotator writes a prompt: it opens a dialogue whose first comparison waits for responses."""
    text = check_text(text, field="text", max_length=MAX_MESSAGE_CHARS).strip()
    if not text:
        raise InvalidInput("the prompt text is empty", field="text")
    risk_category = check_domain_and_risk(domain, risk_category)
    batch = batch or batch_current_open()
    if batch.status != BatchStatus.OPEN:
        raise BatchClosed(f"batch {batch.name!r} is closed")
    prompt = Prompt.objects.create(text=text, domain=domain, risk_category=risk_category, author=author, source=source)
    dialogue = Dialogue.objects.create(prompt=prompt)
    Turn.objects.create(dialogue=dialogue, position=0, role=TurnRole.USER, text=text)
    fill_responses_requested()
    return ComparisonTask.objects.create(
        batch=batch,
        dialogue=dialogue,
        context_length=1,
        domain=domain,
        status=TaskStatus.AWAITING_RESPONSES,
        required_annotations=batch.overlap,
    )


def dialogue_continue(*, annotation: Annotation, user_text: str) -> ComparisonTask:
    """The chosen reply becomes the assistant turn and the annotator's next message opens a new comparison.

    Each continuation forks the dialogue, so several annotators of one task can each go on their own way.
    Call inside the submit transaction.
    """
    task = annotation.task
    chosen = task.response_a if annotation.choice == "a" else task.response_b
    fork = Dialogue.objects.create(prompt=task.dialogue.prompt)
    history = Turn.objects.filter(dialogue=task.dialogue, position__lt=task.context_length).order_by("position")
    Turn.objects.bulk_create(
        [Turn(dialogue=fork, position=t.position, role=t.role, text=t.text, response=t.response) for t in history]
        + [
            Turn(dialogue=fork, position=task.context_length, role=TurnRole.ASSISTANT, text=chosen.text, response=chosen),
            Turn(dialogue=fork, position=task.context_length + 1, role=TurnRole.USER, text=user_text.strip()),
        ]
    )
    fill_responses_requested()
    return ComparisonTask.objects.create(
        batch=task.batch,
        dialogue=fork,
        context_length=task.context_length + 2,
        domain=task.domain,
        status=TaskStatus.AWAITING_RESPONSES,
        required_annotations=task.batch.overlap,
        opened_by=annotation,
    )


def slots_for(task: ComparisonTask) -> list[TaskSlot]:
    """The slot rows of an open, non-gold task (gold tasks are served to every annotator once)."""
    if task.is_gold:
        return []
    return [
        TaskSlot(task=task, index=i, domain=task.domain, batch_id=task.batch_id)
        for i in range(task.required_annotations)
    ]


@transaction.atomic
def task_attach_responses(*, task_id: int, responses: list[dict], policies: dict[str, PolicyVersion]) -> ComparisonTask:
    """A model worker delivers the two responses a waiting comparison needs; the task opens."""
    task = ComparisonTask.objects.select_for_update().filter(pk=task_id).select_related("batch").first()
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    if task.status != TaskStatus.AWAITING_RESPONSES:
        raise Conflict(f"task {task_id} is {task.status}; it is not waiting for responses")
    if task.batch.status != BatchStatus.OPEN:
        raise BatchClosed(f"batch {task.batch.name!r} is closed")
    if responses[0]["text"] == responses[1]["text"]:
        raise InvalidInput("the two responses are identical; a comparison needs two different responses",
                           field="responses")  # fmt: skip
    created = Response.objects.bulk_create(
        [
            Response(
                dialogue_id=task.dialogue_id,
                context_length=task.context_length,
                text=r["text"],
                policy_version=policies[r["policy_version"]],
                sampling=r.get("sampling") or {},
            )
            for r in responses
        ]
    )
    task.response_a, task.response_b = created
    task.status = TaskStatus.OPEN
    task.save(update_fields=["response_a", "response_b", "status"])
    TaskSlot.objects.bulk_create(slots_for(task))
    return task


def dialogue_open(prompt: dict, *, where: str, source: str) -> tuple[Dialogue, int, str, str]:
    """A dialogue from a prompts-file row (`dialogue`: chat turns ending with a user turn, an optional first system
    turn left out; `domain`; `risk_category`): the dialogue, its context length, domain and risk category.
    InvalidInput names `where` (the row)."""
    turns = [t for t in prompt["dialogue"] if t["role"] != "system"]
    domain = prompt.get("domain") or "helpfulness"
    try:
        risk = check_domain_and_risk(domain, prompt.get("risk_category") or ("uncategorized" if domain == "safety" else ""))
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}", field=exc.field) from None
    if not turns or turns[-1]["role"] != "user" or any(t["role"] != ("user", "assistant")[j % 2] for j, t in enumerate(turns)):
        raise InvalidInput(f"{where}: turns must alternate user/assistant and end with a user turn", field="dialogue")
    for j, turn in enumerate(turns):
        check_text(turn["content"], field=f"{where}: turn {j + 1}", max_length=MAX_MESSAGE_CHARS)
    text = turns[0]["content"].strip()
    if not text:
        raise InvalidInput(f"{where}: the first user turn is empty", field="dialogue")
    prompt_row = Prompt.objects.create(text=text, domain=domain, risk_category=risk, source=source)
    dialogue = Dialogue.objects.create(prompt=prompt_row)
    Turn.objects.bulk_create([Turn(dialogue=dialogue, position=j, role=t["role"], text=t["content"])
                              for j, t in enumerate(turns)])  # fmt: skip
    return dialogue, len(turns), domain, risk


@transaction.atomic
def batch_open_with_prompts(*, name: str, prompts: list[dict], overlap: int = 1, test_size: int = 1000,
                            source: str = "prompts-file") -> tuple[Batch, list[int]]:
    """A new open batch whose comparisons wait for responses: one per prompt (rows as `dialogue_open` reads them).
    All or nothing."""
    if Batch.objects.filter(name=name).exists():
        raise Conflict(f"a batch named {name!r} exists")
    if not prompts:
        raise InvalidInput("no prompts", field="prompts")
    batch = Batch.objects.create(name=name, overlap=overlap, test_size=test_size)
    task_ids = []
    for i, p in enumerate(prompts):
        dialogue, context_length, domain, _ = dialogue_open(p, where=f"prompt {i + 1}", source=source)
        task = ComparisonTask.objects.create(batch=batch, dialogue=dialogue, context_length=context_length, domain=domain,
                                             status=TaskStatus.AWAITING_RESPONSES, required_annotations=overlap)  # fmt: skip
        task_ids.append(task.pk)
    return batch, task_ids
