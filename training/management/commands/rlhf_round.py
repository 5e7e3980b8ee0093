import json

from django.core.management.base import BaseCommand, CommandError

from ._runs import start


class Command(BaseCommand):
    help = ("One round of the Llama 2 process: close the batches, train both reward models on every closed batch, "
            "rejection sampling (and PPO with --ppo) from the current policy, evaluate against it and make the new "
            "version current, generate the next batch (--next-prompts, --next-batch). Runs here unless --queue.")

    def add_arguments(self, parser):
        parser.add_argument("--batch", action="append", required=True, help="this round's batch (repeat)")
        parser.add_argument("--name", help="the new policy version (default RLHF-V<n>)")
        parser.add_argument("--reward-model", type=json.loads, default=None, metavar="JSON",
                            help='reward-model settings, e.g. \'{"max_steps": 50}\'')
        parser.add_argument("--rejection-sampling", type=json.loads, default=None, metavar="JSON")
        parser.add_argument("--ppo", type=json.loads, default=None, metavar="JSON", help="run PPO with these settings")
        parser.add_argument("--evaluation", type=json.loads, default=None, metavar="JSON")
        parser.add_argument("--next-prompts", help="prompts file of the next batch")
        parser.add_argument("--next-batch", help="name of the next batch")
        parser.add_argument("--queue", action="store_true")

    def handle(self, *args, **o):
        if bool(o["next_prompts"]) != bool(o["next_batch"]):
            raise CommandError("give --next-prompts and --next-batch together")
        generation = {"prompts": o["next_prompts"], "batch": o["next_batch"]} if o["next_prompts"] else None
        start(self, kind="round", queue=o["queue"], params={
            "batches": o["batch"], "name": o["name"], "reward_model": o["reward_model"],
            "rejection_sampling": o["rejection_sampling"], "ppo": o["ppo"], "evaluation": o["evaluation"],
            "generation": generation,
        })  # fmt: skip
