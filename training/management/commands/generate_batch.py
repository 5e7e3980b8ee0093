from django.core.management.base import BaseCommand

from ._runs import start


class Command(BaseCommand):
    help = ("Open a new batch from a prompts file (training.prompts format) with two responses per prompt sampled "
            "from a policy version; runs here unless --queue hands it to a GPU worker.")

    def add_arguments(self, parser):
        parser.add_argument("--policy", help="policy version (default: the current one)")
        parser.add_argument("--policy-b", help="a second version for response B (default: the same, hotter)")
        parser.add_argument("--prompts", required=True)
        parser.add_argument("--batch", required=True, help="name of the new batch")
        parser.add_argument("--prompt-format", choices=["chat", "plain"])
        parser.add_argument("--temperatures", type=float, nargs=2, metavar=("A", "B"))
        parser.add_argument("--max-new-tokens", type=int)
        parser.add_argument("--overlap", type=int)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--queue", action="store_true")

    def handle(self, *args, **o):
        start(self, kind="generation", queue=o["queue"], params={
            "policy": o["policy"], "policy_b": o["policy_b"], "prompts": o["prompts"], "batch": o["batch"],
            "prompt_format": o["prompt_format"], "temperatures": o["temperatures"], "max_new_tokens": o["max_new_tokens"],
            "overlap": o["overlap"], "seed": o["seed"],
        })  # fmt: skip
