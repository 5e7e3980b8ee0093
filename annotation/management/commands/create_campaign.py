from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from annotation.services.campaigns import campaign_create, prompt_rows
from annotation.services.errors import AnnotationError


class Command(BaseCommand):
    help = ("Create a human-evaluation campaign from a prompts file: pairwise (--baseline) or rating. Lines that "
            "carry `response` (and `baseline_response`) are imported; otherwise a generation run asks the model "
            "worker for the responses.")

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True)
        parser.add_argument("--policy", required=True, help="the version under evaluation")
        parser.add_argument("--baseline", help="pairwise: the version it is compared with")
        parser.add_argument("--prompts", required=True, help="prompts file (JSONL: prompt or dialogue a line)")
        parser.add_argument("--overlap", type=int, default=3)
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, **o):
        path = Path(o["prompts"])
        if not path.is_file():
            raise CommandError(f"{path} does not exist")
        try:
            rows = prompt_rows(path.read_text(encoding="utf-8"), source=str(path))
            campaign = campaign_create(name=o["name"], kind="pairwise" if o["baseline"] else "rating",
                                       policy=o["policy"], baseline=o["baseline"], prompts=rows, overlap=o["overlap"],
                                       seed=o["seed"])  # fmt: skip
        except AnnotationError as exc:
            raise CommandError(exc.message) from None
        waiting = campaign.items.filter(status="awaiting_responses").count()
        self.stdout.write(f"campaign {campaign.name!r}: {campaign.items.count()} items"
                          + (f", {waiting} waiting for the model worker" if waiting else ""))  # fmt: skip
