from django.core.management.base import BaseCommand, CommandError

from annotation.models import PolicyVersion
from annotation.services.errors import AnnotationError
from annotation.services.policies import policy_register


class Command(BaseCommand):
    help = "Register a Meta or Hugging Face Llama checkpoint directory as a policy version (e.g. Llama-2-7b-chat)."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True)
        parser.add_argument("--checkpoint", required=True, help="checkpoint directory on the shared volume")
        parser.add_argument("--tokenizer", help="tokenizer.model (default: in or beside the checkpoint)")
        parser.add_argument("--kind", default="pretrained", choices=["pretrained", "sft", "rejection_sampling", "ppo",
                                                                     "distillation"])
        parser.add_argument("--parent", help="the parent version's name")
        parser.add_argument("--prompt-format", default="chat", choices=["chat", "plain"],
                            help="chat for chat models, plain for base models that continue text")
        parser.add_argument("--current", action="store_true", help="make it the policy the model worker samples")

    def handle(self, *args, **o):
        parent = None
        if o["parent"]:
            parent = PolicyVersion.objects.filter(name=o["parent"]).first()
            if parent is None:
                raise CommandError(f"no policy version named {o['parent']!r}")
        try:
            version = policy_register(name=o["name"], checkpoint=o["checkpoint"], tokenizer=o["tokenizer"],
                                      kind=o["kind"], parent=parent, prompt_format=o["prompt_format"],
                                      current=o["current"])  # fmt: skip
        except AnnotationError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"registered policy {version.name!r} ({version.metrics['layout']} layout)"
                          + (", current" if version.is_current else ""))  # fmt: skip
