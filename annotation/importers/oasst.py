"""Open-Assistant message trees: ranked sibling assistant replies become pairwise comparisons.

The context is the path from the root prompt to the replies' parent. Strength from the rank gap
between the two siblings: 1 -> slightly better, 2 -> better, 3 or more -> significantly better.
"""

from pathlib import Path

from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord

from .common import ImportFormatError, Progress, Skipped, check_storable, jsonl_objects, risk_for

ANNOTATOR = "oasst:rankers"
ROLES = {"prompter": "user", "assistant": "assistant"}


def strength_for_gap(gap: int) -> str:
    return {1: "slightly_better", 2: "better"}.get(gap, "significantly_better")


def _policy(message: dict) -> str:
    return f"oasst:{message.get('model_name') or 'human'}" if message.get("synthetic") else "oasst:human"


def parse(
    path: Path, *, domain: str, skip_invalid: bool = False, skipped: Skipped | None = None,
    progress: Progress | None = None,
) -> list[ComparisonRecord]:
    records: list[ComparisonRecord] = []
    skipped = Skipped() if skipped is None else skipped
    for lineno, tree in jsonl_objects(path, progress):
        where = f"line {lineno}"
        try:
            records.extend(_tree_records(tree, where, domain, flip_start=len(records)))
        except ImportFormatError as e:
            skipped.guard(skip_invalid, e)
    return records


def _tree_records(tree: dict, where: str, domain: str, flip_start: int) -> list[ComparisonRecord]:
    check_storable(tree, where)
    records: list[ComparisonRecord] = []
    root = tree.get("prompt")
    if not isinstance(root, dict):
        raise ImportFormatError(where, "prompt", "missing message tree root")
    stack: list[tuple[dict, tuple[tuple[str, str], ...]]] = [(root, ())]
    while stack:
        message, history = stack.pop()
        role = ROLES.get(message.get("role"))
        text = message.get("text")
        if role is None or not isinstance(text, str):
            raise ImportFormatError(where, "role", f"message {message.get('message_id')}: bad role or text")
        path_turns = (*history, (role, text.strip()))
        replies = [r for r in message.get("replies", []) if not r.get("deleted")]
        if role == "user":
            ranked = sorted(
                (r for r in replies if r.get("role") == "assistant" and isinstance(r.get("rank"), int)),
                key=lambda r: r["rank"],
            )
            for i, better in enumerate(ranked):
                for worse in ranked[i + 1 :]:
                    gap = worse["rank"] - better["rank"]
                    if gap <= 0 or not better["text"].strip() or not worse["text"].strip():
                        continue
                    # Alternate sides so that "A" is not always the better reply.
                    flip = (flip_start + len(records)) % 2 == 1
                    a, b = (worse, better) if flip else (better, worse)
                    records.append(
                        ComparisonRecord(
                            turns=path_turns,
                            response_a=ResponseRecord(a["text"].strip(), _policy(a)),
                            response_b=ResponseRecord(b["text"].strip(), _policy(b)),
                            domain=domain,
                            risk_category=risk_for(domain),
                            votes=(
                                VoteRecord(
                                    annotator=ANNOTATOR,
                                    choice="b" if flip else "a",
                                    strength=strength_for_gap(gap),
                                ),
                            ),
                            source="oasst",
                            origin=f"{where}, message {message.get('message_id')}",
                        )
                    )
        stack.extend((r, path_turns) for r in reversed(replies))
    return records
