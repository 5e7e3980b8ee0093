from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from tqdm import tqdm

from annotation.importers import PARSERS, parse_file
from annotation.importers.common import FileUnreadable
from annotation.models import Batch
from annotation.services.errors import AnnotationError
from annotation.services.imports import comparisons_store
from annotation.validation import check_overlap, check_text


class Command(BaseCommand):
    help = "Import a preference file (HH-RLHF, PandaLM, Open-Assistant trees, native) into a batch; all or nothing."

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path)
        parser.add_argument("--format", required=True, choices=sorted(PARSERS))
        parser.add_argument("--domain", required=True, choices=["helpfulness", "safety"])
        parser.add_argument("--batch", required=True, help="batch name; created (open) if it does not exist")
        parser.add_argument("--overlap", type=int, default=1, help="overlap of a newly created batch")
        parser.add_argument(
            "--skip-invalid",
            action="store_true",
            help="leave out bad records (each is reported) instead of failing",
        )

    def handle(self, *args, path: Path, format: str, domain: str, batch: str, overlap: int, **options):
        try:
            check_text(batch, field="--batch", max_length=100)
            check_overlap(overlap)
        except AnnotationError as e:
            raise CommandError(e.message.replace("overlap must", "--overlap must", 1)) from None
        try:
            # A bar of the file's bytes while it is read and checked (on a terminal only, as below).
            size = path.stat().st_size if path.is_file() else None
            with tqdm(total=size, unit="B", unit_scale=True, desc="reading", disable=None) as bar:
                records, skipped = parse_file(format, path, domain=domain, skip_invalid=options["skip_invalid"],
                                              progress=lambda done: bar.update(done - bar.n))
        except FileUnreadable as e:
            raise CommandError(f"{path}: {e.message} (nothing was imported)") from None
        except AnnotationError as e:
            raise CommandError(
                f"{path}: {e.message} (nothing was imported; --skip-invalid leaves such records out)"
            ) from None
        for _where, message in skipped:
            self.stderr.write(f"skipped {path}: {message}")
        if not records:
            raise CommandError(f"{path}: no comparisons found")
        self.stderr.write(f"read {len(records)} comparisons from {path}; storing them in one transaction")
        try:
            # The batch is created in the store's transaction: a failed import leaves no empty batch behind.
            with transaction.atomic():
                batch_obj, _ = Batch.objects.get_or_create(name=batch, defaults={"overlap": overlap})
                # A bar on a terminal (tqdm leaves it out when stderr is not one).
                with tqdm(total=len(records), unit=" comparisons", desc="storing", disable=None) as bar:
                    stored = comparisons_store(
                        batch=batch_obj, records=records, create_external_policies=True, progress=bar.update
                    )
        except AnnotationError as e:
            raise CommandError(f"{path}: {e.message} (nothing was imported)") from None
        message = f"imported {stored.created} comparisons with {stored.annotations} annotations into batch {batch!r}"
        if stored.existing:
            message += f"; {stored.existing} were in the batch already and were left as they were"
        self.stdout.write(message)
