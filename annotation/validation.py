"""One rule for the text and JSON that users send: the API, the web pages and the importers all check here.

PostgreSQL cannot store a NUL character in text or JSON, and a lone surrogate (half of a UTF-16 pair, which
JSON's "\\udc80" escape can carry) is not Unicode text at all: both are refused with a message naming the
field, before anything reaches the database, and the message is the same wherever the input came in.
"""

import json
import math

from annotation.scales import MAX_TIME_ON_TASK_MS
from annotation.services.errors import InvalidInput

# How long an annotator's note and next message may be.
MAX_NOTE_CHARS = 10_000
MAX_MESSAGE_CHARS = 50_000
MAX_RESPONSE_CHARS = 200_000
# Labels and other choices (choice, strength, safety_label, domain, kind): longer text is no choice of ours.
MAX_LABEL_CHARS = 32

# A batch's overlap is a small integer column.
MAX_OVERLAP = 32_767

# Bounds on the free-form JSON settings of a record (`metrics`, `sampling`, `params`).
MAX_JSON_DEPTH = 20
MAX_JSON_CHARS = 100_000


def text_problem(value: str) -> str | None:
    """What makes `value` unstorable as text (a NUL, a lone surrogate), or None."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate ({ascii(value[e.start])[1:-1]}), which is not valid Unicode text"
    return None


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_text(value, *, field: str, max_length: int | None = None) -> str:
    """`value` if it is storable text of at most `max_length` characters, else InvalidInput naming `field`."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be text, got {_kind(value)}", field=field)
    if problem := text_problem(value):
        raise InvalidInput(f"{field} {problem}", field=field)
    if max_length is not None and len(value) > max_length:
        raise InvalidInput(f"{field} is longer than {max_length} characters", field=field)
    return value


def _key_path(path: str, key: str) -> str:
    # json.dumps escapes NULs and surrogates, so the message itself is always printable.
    return f"{path}[{json.dumps(key)}]"


def _walk(value, path: str, depth: int, field: str) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(f"{field} is nested more than {MAX_JSON_DEPTH} levels deep", field=field)
    if isinstance(value, str):
        if problem := text_problem(value):
            raise InvalidInput(f"{path} {problem}", field=field)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{path} is {value}, which JSON cannot hold", field=field)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"{path} has a key that is not text ({key!r})", field=field)
            if problem := text_problem(key):
                raise InvalidInput(f"{path} has a key that {problem}", field=field)
            _walk(item, _key_path(path, key), depth + 1, field)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", depth + 1, field)
    elif value is not None and not isinstance(value, bool | int):
        raise InvalidInput(f"{path} is {_kind(value)}, which JSON cannot hold", field=field)


def check_json(value, *, field: str, max_chars: int = MAX_JSON_CHARS):
    """`value` if every key and string in it, at any depth, is storable text and it fits in `max_chars`
    characters of JSON; else InvalidInput naming the path (`sampling["top_p"]`) and `field`."""
    _walk(value, field, 0, field)
    if len(json.dumps(value)) > max_chars:
        raise InvalidInput(f"{field} is longer than {max_chars} characters as JSON", field=field)
    return value


def check_json_object(value, *, field: str, max_chars: int = MAX_JSON_CHARS) -> dict:
    """Like `check_json`, for settings that must be a JSON object."""
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be an object, got {_kind(value)}", field=field)
    return check_json(value, field=field, max_chars=max_chars)


def check_request_json(value) -> None:
    """Every key and string of a request body, at any depth: an unstorable one is refused wherever it sits,
    naming the top-level field it is under (the message for a top-level text is `check_text`'s)."""
    if not isinstance(value, dict):
        _walk(value, "the request body", 1, "(body)")
        return
    for key, item in value.items():
        if problem := text_problem(key):
            raise InvalidInput(f"the request body has a key that {problem}")
        _walk(item, key, 1, key)


def parse_json(raw: bytes | str, *, what: str = "the request body"):
    """Decode JSON strictly (no NaN or Infinity, bounded nesting), else InvalidInput saying why."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} is not UTF-8") from None
    except ValueError as e:
        raise InvalidInput(f"{what} is not valid JSON: {e}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_overlap(value) -> int:
    """A batch's overlap: distinct annotators per task, from 1 to what its column holds."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OVERLAP:
        raise InvalidInput(f"overlap must be a whole number from 1 to {MAX_OVERLAP}, got {value!r}", field="overlap")
    return value


def check_time_on_task_ms(value) -> int | None:
    """Time on task as the client measured it: None, or a whole number of milliseconds up to a day (digits
    in a string count too: a form post carries text)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME_ON_TASK_MS:
        shown = ascii(value) if len(ascii(value)) <= 40 else ascii(value)[:37] + "..."
        raise InvalidInput(
            f"time_on_task_ms must be a whole number of milliseconds from 0 to {MAX_TIME_ON_TASK_MS} (a day), "
            f"got {shown}",
            field="time_on_task_ms",
        )
    return value
