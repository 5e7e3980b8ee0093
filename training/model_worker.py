"""The model worker: a policy writes the two responses of every comparison that waits for them.

Comparisons wait for responses when an annotator writes a prompt, continues a dialogue, or a batch is opened from
a prompts file. The worker samples two responses per comparison, batched and KV-cached (training.sampling): by
default from the current policy at two temperatures (the report samples "two different model variants", varying
the temperature), or from two named versions. Which variant lands on side A is drawn per task and recorded in each
response's `sampling`, with the settings and seed that produced it, so the comparison is blind and traceable.

Loaded policies stay in memory between calls (a worker process serves many small asks), keyed by checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings

from annotation.models import BatchStatus, ComparisonTask, PolicyVersion, TaskStatus
from annotation.selectors import task_context
from annotation.services.dialogues import task_attach_responses
from annotation.services.errors import AnnotationError
from training.prompts import PromptRecord


@dataclass(frozen=True)
class ResponderSettings:
    temperatures: tuple[float, float] = (0.6, 1.0)
    max_new_tokens: int = 128
    top_p: float = 0.9
    prompt_format: str | None = None  # default: the policy's (registered with it), else chat
    batch_size: int = 32
    seed: int | None = None  # None: a fresh draw each call (recorded on every response)
    retries: int = 3  # draws of B again where it came out identical to A

    @classmethod
    def from_settings(cls, **overrides: Any) -> ResponderSettings:
        values: dict[str, Any] = {"temperatures": tuple(django_settings.MODEL_WORKER_TEMPERATURES),
                                  "max_new_tokens": django_settings.MODEL_WORKER_MAX_NEW_TOKENS}  # fmt: skip
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["temperatures"] = tuple(values["temperatures"])
        return cls(**values)


class PolicyCache:
    """The last few loaded policies (model, tokenizer), keyed by checkpoint path and modification time."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[tuple[str, float], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: PolicyVersion) -> tuple[Any, Any]:
        from training.llama.tokenizer import Tokenizer
        from training.sampling import check_vocabulary, find_tokenizer, load_policy

        path = Path(version.checkpoint_uri)
        key = (str(path), path.stat().st_mtime if path.exists() else 0.0)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            model = load_policy(path)
            tokenizer = Tokenizer(find_tokenizer(path, version.tokenizer_uri or None))
            check_vocabulary(model, tokenizer)
            self._items[key] = (model, tokenizer)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return model, tokenizer


POLICIES = PolicyCache()


def fit_context(tokenizer: Any, record: PromptRecord, prompt_format: str, room: int) -> PromptRecord | None:
    """The record, its oldest exchanges dropped until the prompt leaves `room` tokens; None where even the last
    user turn is too long."""
    from training.prompts import encode_prompt

    dialogue = list(record.dialogue)
    while True:
        candidate = PromptRecord(tuple(dialogue), record.domain, record.risk_category, None, record.source)
        if len(encode_prompt(tokenizer, candidate, prompt_format)) <= room:
            return candidate
        if len(dialogue) < 3:
            return None
        dialogue = dialogue[2:]


def sample_variants(version: PolicyVersion, records: Sequence[PromptRecord], temperatures: Sequence[float],
                    settings: ResponderSettings, seed: int, progress: Callable[[int, int], None] | None = None,
                    ) -> list[tuple[list[str | None], dict[str, Any]]]:
    """An answer a record from `version` at each of `temperatures` (None where the context cannot fit), with the
    settings that drew them. Sampled temperatures share the batches (one decoding pass for a comparison's two
    variants rather than one a variant: the per-step cost of a small model is mostly fixed)."""
    from training.sampling import SamplingSettings, sample_answers

    model, tokenizer = POLICIES.get(version)
    prompt_format = settings.prompt_format or version.metrics.get("prompt_format", "chat")
    room = model.args.max_seq_len - min(settings.max_new_tokens, model.args.max_seq_len // 2)
    fitted = [fit_context(tokenizer, r, prompt_format, room) for r in records]
    usable = [i for i, r in enumerate(fitted) if r is not None]
    together = len(temperatures) > 1 and all(t > 0 for t in temperatures)
    groups = [list(temperatures)] if together else [[t] for t in temperatures]
    out: list[tuple[list[str | None], dict[str, Any]]] = []
    for group in groups:
        sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=group[0], top_p=settings.top_p,
                                    prompt_format=prompt_format, batch_size=settings.batch_size * len(group))  # fmt: skip
        jobs = [(i, t) for t in group for i in usable]
        samples = sample_answers(model, tokenizer, [fitted[i] for i, _ in jobs], sampling, seed=seed, progress=progress,
                                 temperatures=[t for _, t in jobs] if together else None)  # fmt: skip
        for t in group:
            texts: list[str | None] = [None] * len(records)
            for (i, t_job), sample in zip(jobs, samples, strict=True):
                if t_job == t:
                    texts[i] = sample.response.strip()
            out.append((texts, {**sampling.as_dict(), "temperature": t, "seed": seed, "policy": version.name,
                                "batch_size": sampling.batch_size}))  # fmt: skip
    return out


def sample_variant(version: PolicyVersion, records: Sequence[PromptRecord], temperature: float,
                   settings: ResponderSettings, seed: int,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[str | None], dict[str, Any]]:
    """One answer a record from `version` at `temperature` (None where the context cannot fit); the settings."""
    return sample_variants(version, records, [temperature], settings, seed, progress)[0]


SKIPPED_KEY = "model-worker:skipped"  # tasks the worker could not answer lately: the poll tries newer ones first
SKIPPED_SECONDS = 600


def waiting_tasks(task_ids: Sequence[int] | None = None, limit: int = 256) -> list[ComparisonTask]:
    """Comparisons waiting for responses in open batches, oldest first: the ones given, or (the poll) all but those
    of a batch a generation run is opening with its own policy and settings, and those it could not answer in the
    last SKIPPED_SECONDS (they come last, so that they never hold back newer prompts)."""
    from django.core.cache import cache

    from annotation.models import RunKind, RunStatus, TrainingRun

    tasks = ComparisonTask.objects.filter(status=TaskStatus.AWAITING_RESPONSES, batch__status=BatchStatus.OPEN)
    if task_ids is not None:
        return list(tasks.filter(pk__in=list(task_ids)).order_by("id")[:limit])
    reserved = [p.get("batch") for p in TrainingRun.objects.filter(
        kind=RunKind.GENERATION, status__in=(RunStatus.QUEUED, RunStatus.RUNNING)).values_list("params", flat=True)]  # fmt: skip
    tasks = tasks.exclude(batch__name__in=[b for b in reserved if b])
    skipped = set(cache.get(SKIPPED_KEY) or ())
    fresh = list(tasks.exclude(pk__in=skipped).order_by("id")[:limit])
    return fresh + list(tasks.filter(pk__in=skipped).order_by("id")[:max(0, limit - len(fresh))])


def remember_skipped(task_ids: Sequence[int]) -> None:
    from django.core.cache import cache

    if task_ids:
        cache.set(SKIPPED_KEY, list({*(cache.get(SKIPPED_KEY) or ()), *task_ids})[-5000:], SKIPPED_SECONDS)


def fill_awaiting(*, task_ids: Sequence[int] | None = None, policy: str | None = None, policy_b: str | None = None,
                  settings: ResponderSettings | None = None, limit: int = 256,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Sample and attach the two responses of waiting comparisons (all, or `task_ids`): a summary with the
    counts. Without a current (or named) policy nothing happens and the summary says why."""
    settings = settings or ResponderSettings.from_settings()
    if settings.seed is None:
        settings = dataclasses.replace(settings, seed=random.randrange(2**31))
    assert settings.seed is not None
    tasks = waiting_tasks(task_ids, limit)
    if not tasks:
        return {"waiting": 0, "filled": 0, "skipped": 0}
    version_a = (PolicyVersion.objects.filter(name=policy).first() if policy
                 else PolicyVersion.objects.filter(is_current=True).first())  # fmt: skip
    if version_a is None or not version_a.checkpoint_uri:
        return {"waiting": len(tasks), "filled": 0, "skipped": 0, "reason": "no current policy with a checkpoint"}
    version_b = PolicyVersion.objects.get(name=policy_b) if policy_b else version_a
    records = [PromptRecord(tuple(task_context(t)), domain=t.domain, source=f"task {t.pk}") for t in tasks]
    total = len(records) * 2
    if version_b.pk == version_a.pk:  # one policy at two temperatures: both variants in the same batches
        (a_texts, a_sampling), (b_texts, b_sampling) = sample_variants(
            version_a, records, settings.temperatures, settings, settings.seed, progress)  # fmt: skip
    else:
        a_texts, a_sampling = sample_variant(version_a, records, settings.temperatures[0], settings, settings.seed,
                                             _offset(progress, 0, total))  # fmt: skip
        b_texts, b_sampling = sample_variant(version_b, records, settings.temperatures[1], settings,
                                             settings.seed + 1, _offset(progress, len(records), total))  # fmt: skip
    for attempt in range(1, settings.retries + 1):  # B again where it wrote exactly A's text
        same = [i for i, (a, b) in enumerate(zip(a_texts, b_texts, strict=True)) if a is not None and a == b]
        if not same:
            break
        again, _ = sample_variant(version_b, [records[i] for i in same], settings.temperatures[1], settings,
                                  settings.seed + 1 + 7919 * attempt)  # fmt: skip
        for i, text in zip(same, again, strict=True):
            b_texts[i] = text
    filled, skipped = 0, []
    sides = random.Random(f"sides:{settings.seed}")
    for task, a, b in zip(tasks, a_texts, b_texts, strict=True):
        if not a or not b or a == b:
            skipped.append(task.pk)  # too long a context, an empty answer, or twice the same: stays waiting
            continue
        variants = [{"text": a, "policy_version": version_a.name, "sampling": {**a_sampling, "variant": "a"}},
                    {"text": b, "policy_version": version_b.name, "sampling": {**b_sampling, "variant": "b"}}]
        if sides.random() < 0.5:
            variants.reverse()
        try:
            task_attach_responses(task_id=task.pk, responses=variants,
                                  policies={version_a.name: version_a, version_b.name: version_b})  # fmt: skip
            filled += 1
        except AnnotationError:
            skipped.append(task.pk)  # filled by another worker meanwhile, or its batch closed
    remember_skipped(skipped)
    return {"waiting": len(tasks), "filled": filled, "skipped": len(skipped), "skipped_tasks": skipped[:50],
            "policy": version_a.name, "policy_b": version_b.name}


def _offset(progress: Callable[[int, int], None] | None, base: int, total: int) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, _n: progress(base + done, total)


def fill_campaign(name: str, *, settings: ResponderSettings | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Sample the responses of a campaign's items waiting for them: the candidate's, and for a pairwise campaign the
    baseline's, both at the first temperature (a fair comparison: the same sampling for both versions)."""
    from django.db import transaction

    from annotation.models import Campaign, ItemStatus
    from annotation.services.campaigns import item_attach

    settings = settings or ResponderSettings.from_settings()
    if settings.seed is None:
        settings = dataclasses.replace(settings, seed=random.randrange(2**31))
    assert settings.seed is not None
    campaign = Campaign.objects.select_related("policy", "baseline").get(name=name)
    items = list(campaign.items.filter(status=ItemStatus.AWAITING_RESPONSES).order_by("id"))
    if not items:
        return {"waiting": 0, "filled": 0, "skipped": 0}
    records = [PromptRecord(tuple(task_context(i)), domain=i.domain, source=f"item {i.pk}") for i in items]
    temperature = settings.temperatures[0]
    total = len(records) * (2 if campaign.baseline else 1)
    texts, sampling = sample_variant(campaign.policy, records, temperature, settings, settings.seed,
                                     _offset(progress, 0, total))  # fmt: skip
    base_texts: list[str | None] = [None] * len(items)
    base_sampling: dict[str, Any] = {}
    if campaign.baseline is not None:
        base_texts, base_sampling = sample_variant(campaign.baseline, records, temperature, settings, settings.seed + 1,
                                                   _offset(progress, len(records), total))  # fmt: skip
    filled, skipped = 0, []
    for item, text, base in zip(items, texts, base_texts, strict=True):
        if not text or (campaign.baseline is not None and (not base or base == text)):
            skipped.append(item.pk)
            continue
        try:
            with transaction.atomic():
                item_attach(item=item, response=text, baseline_response=base, sampling=sampling,
                            baseline_sampling=base_sampling or None)  # fmt: skip
            filled += 1
        except AnnotationError:
            skipped.append(item.pk)
    return {"waiting": len(items), "filled": filled, "skipped": len(skipped), "skipped_items": skipped[:50]}
