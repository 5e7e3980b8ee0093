from django.core.management.base import BaseCommand, CommandError

from rewards.configs import CONFIG_NAMES
from rewards.runs import reward_run_create


class Command(BaseCommand):
    help = "Train a helpfulness or safety reward model on platform batches and register the version."

    def add_arguments(self, parser):
        parser.add_argument("--kind", required=True, choices=["helpfulness", "safety"])
        parser.add_argument("--batch", action="append", required=True, help="batch name (repeat for several)")
        parser.add_argument("--name", required=True, help="name of the new RewardModelVersion")
        init = parser.add_mutually_exclusive_group(required=True)
        init.add_argument("--init", help="a chat/policy checkpoint directory (Meta or Hugging Face format)")
        init.add_argument("--config", choices=CONFIG_NAMES, help="a from-scratch config")
        parser.add_argument("--tokenizer", help="tokenizer.model (required with --config)")
        parser.add_argument("--max-minutes", type=float)
        parser.add_argument("--max-steps", type=int)
        parser.add_argument("--margin", choices=["none", "small", "large"], default="none")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--ensemble", type=int,
                            help="train this many models from their own initialisations; the version scores with their mean")
        parser.add_argument("--queue", action="store_true", help="hand the run to a GPU worker instead of running here")

    def handle(self, *args, **o):
        if o["config"] and not o["tokenizer"]:
            raise CommandError("--config needs --tokenizer")
        params = {
            k: v
            for k, v in {
                "init": o["init"], "config": o["config"], "tokenizer": o["tokenizer"], "max_minutes": o["max_minutes"],
                "max_steps": o["max_steps"], "margin": o["margin"], "seed": o["seed"], "ensemble": o["ensemble"],
            }.items()
            if v is not None
        }  # fmt: skip
        try:
            run = reward_run_create(kind=o["kind"], batches=o["batch"], name=o["name"], params=params)
        except ValueError as e:
            raise CommandError(str(e)) from None
        if o["queue"]:
            from annotation.services.runs import run_send

            run_send(run)
            self.stdout.write(f"queued training run {run.id}")
            return
        from training.runs import execute_run

        status = execute_run(run.id)
        run.refresh_from_db()
        if status != "succeeded":
            raise CommandError(f"run {run.id} {status}: {run.error}")
        version = run.reward_model_version
        accuracy = version.metrics.get("accuracy")
        self.stdout.write(f"registered reward model {version.name!r} (run {run.id}), test accuracy {accuracy}")
