"""Anthropic HH-RLHF: {"chosen": transcript, "rejected": transcript}, the transcripts sharing all but
the last assistant reply. HH-RLHF records a preference without a strength."""

import hashlib
import json
import re
from pathlib import Path

from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord

from .common import ImportFormatError, Progress, Skipped, check_storable, jsonl_objects, require_str, risk_for

POLICY = "hh-rlhf:anthropic"
ANNOTATOR = "hh-rlhf:crowdworker"
_SPEAKER = re.compile(r"\n\n(Human|Assistant): ")


def parse_transcript(text: str, where: str, field: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [(role, text), ...]."""
    parts = _SPEAKER.split(text)
    if parts[0].strip():
        raise ImportFormatError(where, field, "text before the first 'Human:' turn")
    turns = []
    for speaker, body in zip(parts[1::2], parts[2::2], strict=True):
        turns.append(("user" if speaker == "Human" else "assistant", body.strip()))
    if len(turns) < 2 or turns[-1][0] != "assistant":
        raise ImportFormatError(where, field, "a transcript must end with an 'Assistant:' reply")
    return turns


def _a_is_chosen(context: tuple, chosen: str, rejected: str) -> bool:
    """Place the chosen reply on side A or B by a hash of the pair, so that the position carries no signal
    and the same pair lands on the same sides wherever it is in a file (an import is recognised again)."""
    return hashlib.sha256(json.dumps([context, chosen, rejected], ensure_ascii=False).encode()).digest()[0] % 2 == 0


def parse(
    path: Path, *, domain: str, skip_invalid: bool = False, skipped: Skipped | None = None,
    progress: Progress | None = None,
) -> list[ComparisonRecord]:
    records = []
    skipped = Skipped() if skipped is None else skipped
    for lineno, obj in jsonl_objects(path, progress):
        where = f"line {lineno}"
        try:
            records.append(_record(obj, where, domain))
        except ImportFormatError as e:
            skipped.guard(skip_invalid, e)
    return records


def _record(obj: dict, where: str, domain: str) -> ComparisonRecord:
    check_storable(obj, where)
    chosen = parse_transcript(require_str(obj, "chosen", where), where, "chosen")
    rejected = parse_transcript(require_str(obj, "rejected", where), where, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise ImportFormatError(where, "rejected", "chosen and rejected must share every turn but the last")
    context = tuple(chosen[:-1])
    good, bad = ResponseRecord(chosen[-1][1], POLICY), ResponseRecord(rejected[-1][1], POLICY)
    # An empty final reply is real data (an empty answer preferred to a harmful one): stored as it is.
    a_chosen = _a_is_chosen(context, good.text, bad.text)
    return ComparisonRecord(
        turns=context,
        response_a=good if a_chosen else bad,
        response_b=bad if a_chosen else good,
        domain=domain,
        risk_category=risk_for(domain),
        votes=(VoteRecord(annotator=ANNOTATOR, choice="a" if a_chosen else "b"),),
        source="hh-rlhf",
        origin=where,
    )
