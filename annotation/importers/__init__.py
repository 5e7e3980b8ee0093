"""Parsers of preference files into `ComparisonRecord`s: HH-RLHF, PandaLM, Open-Assistant trees, native.

Each parser reads the whole file and validates every record before anything is stored, and names the
line (or item) and field of the first problem it meets.
"""

from collections.abc import Callable
from pathlib import Path

from annotation.services.errors import InvalidInput
from annotation.services.imports import ComparisonRecord, check_record

from . import hh_rlhf, native, oasst, pandalm
from .common import ImportFormatError, Progress, Skipped

PARSERS: dict[str, Callable[..., list[ComparisonRecord]]] = {
    "hh-rlhf": hh_rlhf.parse,
    "pandalm": pandalm.parse,
    "oasst": oasst.parse,
    "native": native.parse,
}


def parse_file(
    fmt: str, path: Path, *, domain: str, skip_invalid: bool = False, progress: Progress | None = None
) -> tuple[list[ComparisonRecord], Skipped]:
    """Parse a whole file; a bad record raises ImportFormatError, or is listed in `Skipped` with skip_invalid.

    `progress`, if given, is told now and then how many bytes of the file (as stored) have been read.
    """
    if fmt not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(PARSERS)}")
    skipped = Skipped()
    parsed = PARSERS[fmt](Path(path), domain=domain, skip_invalid=skip_invalid, skipped=skipped, progress=progress)
    records = []
    for record in parsed:  # the checks the store makes, here, so that bad records can be skipped
        try:
            check_record(record)
        except InvalidInput as e:
            where, _, message = e.message.partition(": ")
            skipped.guard(skip_invalid, ImportFormatError(where, e.field or "(record)", message))
            continue
        records.append(record)
    return records, skipped
