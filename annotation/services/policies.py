"""Policy versions as rows: register a checkpoint, make a version current.

A checkpoint is a directory in Meta's layout (params.json and consolidated.*.pth) or Hugging Face's
(config.json and *.safetensors or *.bin); its tokenizer is a sentencepiece `tokenizer.model` given, or in or beside
the directory. Only the files' presence is checked here (the web process never loads a model); a worker loads it.
"""

from __future__ import annotations

from pathlib import Path

from django.db import transaction

from annotation.models import PolicyKind, PolicyVersion

from .errors import Conflict, InvalidInput, NotFound
from .runs import NAME_RE, check_input_path, fill_responses_requested

PROMPT_FORMATS = ("chat", "plain")


def checkpoint_layout(path: Path) -> str | None:
    """'meta', 'hf' or None where the directory holds neither layout."""
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return "hf"
    return None


def tokenizer_of(checkpoint: Path, tokenizer: str | None) -> Path:
    if tokenizer:
        path = Path(tokenizer)
        if not path.is_file():
            raise InvalidInput(f"tokenizer {path} does not exist", field="tokenizer_uri")
        return path.resolve()
    for candidate in (checkpoint / "tokenizer.model", checkpoint.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate.resolve()
    raise InvalidInput(f"no tokenizer.model in or beside {checkpoint}; give the tokenizer", field="tokenizer_uri")


@transaction.atomic
def policy_register(*, name: str, checkpoint: str, tokenizer: str | None = None, kind: str = PolicyKind.PRETRAINED,
                    parent: PolicyVersion | None = None, metrics: dict | None = None, prompt_format: str = "chat",
                    current: bool = False) -> PolicyVersion:
    """A new PolicyVersion for a checkpoint directory on the shared volume.

    Registering the same name for the same checkpoint again returns the row (a run re-executed after its worker
    died registers once); the same name for another checkpoint is a Conflict."""
    if not NAME_RE.match(name or ""):
        raise InvalidInput("name: letters, digits, '.', '_' and '-' only, at most 100", field="name")
    if kind not in PolicyKind.values:
        raise InvalidInput(f"kind must be one of {PolicyKind.values}", field="kind")
    if prompt_format not in PROMPT_FORMATS:
        raise InvalidInput(f"prompt_format must be one of {list(PROMPT_FORMATS)}", field="prompt_format")
    check_input_path(checkpoint, "checkpoint_uri")
    if tokenizer:
        check_input_path(tokenizer, "tokenizer_uri")
    path = Path(checkpoint).resolve()
    if not path.is_dir():
        raise InvalidInput(f"checkpoint {checkpoint} is not a directory", field="checkpoint_uri")
    layout = checkpoint_layout(path)
    if layout is None:
        raise InvalidInput(f"{checkpoint} holds neither a Meta (params.json, consolidated.*.pth) nor a Hugging Face "
                           "(config.json, *.safetensors or *.bin) checkpoint", field="checkpoint_uri")  # fmt: skip
    tokenizer_path = tokenizer_of(path, tokenizer)
    existing = PolicyVersion.objects.filter(name=name).first()
    if existing is not None:
        if Path(existing.checkpoint_uri) == path:
            return existing
        raise Conflict(f"a policy version named {name!r} exists (checkpoint {existing.checkpoint_uri})")
    version = PolicyVersion.objects.create(
        name=name, kind=kind, parent=parent, checkpoint_uri=str(path), tokenizer_uri=str(tokenizer_path),
        metrics={**(metrics or {}), "layout": layout, "prompt_format": prompt_format},
    )  # fmt: skip
    if current:
        policy_make_current(version=version, force=True)
    return version


@transaction.atomic
def policy_make_current(*, version: PolicyVersion | None = None, name: str = "", force: bool = False) -> PolicyVersion:
    """Make a version the one the model worker samples. A version a stage produced must have been evaluated
    first (metrics["evaluation"]); `force` is for checkpoints registered by hand (a chat model to start from)."""
    if version is None:
        version = PolicyVersion.objects.select_for_update().filter(name=name).first()
        if version is None:
            raise NotFound(f"no policy version named {name!r}")
    if not force and version.kind not in (PolicyKind.PRETRAINED, PolicyKind.EXTERNAL) and "evaluation" not in version.metrics:
        raise Conflict(f"policy {version.name!r} has not been evaluated; evaluate it against its parent first")
    if not version.checkpoint_uri:
        raise Conflict(f"policy {version.name!r} has no checkpoint; the model worker could not sample it")
    PolicyVersion.objects.filter(is_current=True).exclude(pk=version.pk).update(is_current=False)
    if not version.is_current:
        version.is_current = True
        version.save(update_fields=["is_current"])
    fill_responses_requested()  # comparisons waiting for a policy get one now
    return version
