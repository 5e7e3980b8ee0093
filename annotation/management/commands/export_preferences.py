import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from annotation.services.errors import AnnotationError
from annotation.services.exports import (
    FORMATS,
    ExportFilters,
    comparisons_export_count,
    comparisons_export_lines,
)


class Command(BaseCommand):
    help = "Export comparisons as JSONL (native, trl or hh-rlhf) to a file or standard output (-)."

    def add_arguments(self, parser):
        parser.add_argument("--format", default="native", choices=FORMATS)
        parser.add_argument("--batch")
        parser.add_argument("--domain", choices=["helpfulness", "safety"])
        parser.add_argument("--split", choices=["train", "test"])
        parser.add_argument("--margin", default="small", choices=["none", "small", "large"])
        parser.add_argument("--aggregate", action="store_true", help="one row per task: the adjudication where there is one, else the majority vote")
        parser.add_argument("--include-gold", action="store_true")
        parser.add_argument("--out", required=True, help="output path, or - for standard output")

    def handle(self, *args, **o):
        filters = ExportFilters(
            batch=o["batch"], domain=o["domain"], split=o["split"], include_gold=o["include_gold"]
        )
        lines = comparisons_export_lines(
            filters=filters, fmt=o["format"], margin=o["margin"], aggregate=o["aggregate"]
        )
        try:
            if o["out"] == "-":
                try:
                    n = sum(sys.stdout.write(chunk) and chunk.count("\n") for chunk in lines)
                except BrokenPipeError:  # the reader stopped early (| head): not an error
                    sys.stderr.close()
                    return
            else:
                out = Path(o["out"])
                tmp = out.with_name(out.name + ".partial")
                total = comparisons_export_count(filters=filters, aggregate=o["aggregate"])
                # A bar on a terminal (tqdm leaves it out when stderr is not one).
                with tmp.open("w", encoding="utf-8") as f, tqdm(total=total, unit=" rows", disable=None) as bar:
                    n = 0
                    for chunk in lines:
                        f.write(chunk)
                        n += (rows := chunk.count("\n"))
                        bar.update(rows)
                tmp.replace(out)  # a crash never leaves half an export under the real name
        except AnnotationError as e:
            raise CommandError(e.message) from None
        self.stderr.write(f"exported {n} rows")
