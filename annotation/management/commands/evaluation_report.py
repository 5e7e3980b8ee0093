import json

from django.core.management.base import BaseCommand, CommandError

from annotation.evaluation_results import campaign_results, results_markdown
from annotation.models import Campaign


class Command(BaseCommand):
    help = ("A campaign's results as Markdown tables (win / tie / loss or mean ratings and violation rates with 95% "
            "intervals, per domain and risk category, and inter-rater agreement), or --json.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="the campaign's name")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, **o):
        campaign = Campaign.objects.select_related("policy", "baseline").filter(name=o["campaign"]).first()
        if campaign is None:
            raise CommandError(f"no campaign named {o['campaign']!r}")
        results = campaign_results(campaign)
        self.stdout.write(json.dumps(results, indent=2) if o["json"] else results_markdown(results), ending="")
