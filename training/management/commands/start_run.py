import json

from django.core.management.base import BaseCommand, CommandError

from ._runs import start


class Command(BaseCommand):
    help = ("Start a run of any kind with parameters as the API takes them: start_run ppo --param iterations=20 "
            "--param policy=SFT (values are JSON where they parse, else strings); --queue hands it to a worker.")

    def add_arguments(self, parser):
        parser.add_argument("kind", choices=["reward_model", "sft", "rejection_sampling", "ppo", "distillation",
                                             "generation", "evaluation", "round"])
        parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
        parser.add_argument("--queue", action="store_true")

    def handle(self, *args, **o):
        params = {}
        for item in o["param"]:
            key, sep, value = item.partition("=")
            if not sep:
                raise CommandError(f"--param {item!r}: give KEY=VALUE")
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
        start(self, kind=o["kind"], params=params, queue=o["queue"])
