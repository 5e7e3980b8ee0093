import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from annotation.models import PolicyVersion
from annotation.services.errors import AnnotationError
from annotation.services.policies import policy_make_current, policy_register

DEMO = Path(__file__).resolve().parents[3] / "annotation" / "demo_data.json"
NAME = "demo-chat"


class Command(BaseCommand):
    help = ("Give the embedded demo a policy the model worker can sample: a tiny Llama trained from scratch on the "
            "demo's dialogues (seconds, on a CPU; kept under VAR_DIR/demo), or --checkpoint DIR of your own. Makes it "
            "current, so prompts written in the UI are answered. Idempotent.")

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", help="a Meta or Hugging Face checkpoint to use instead")
        parser.add_argument("--tokenizer", help="its tokenizer.model (default: in or beside it)")
        parser.add_argument("--prompt-format", default="chat", choices=["chat", "plain"])
        parser.add_argument("--seconds", type=float, default=15.0, help="training time of the demo policy")

    def handle(self, *args, **o):
        if not settings.ALLOW_DEMO_DATA:
            raise CommandError("demo_policy is for the embedded demo; refused under these settings")
        name = NAME if o["checkpoint"] is None else "demo-custom"
        existing = PolicyVersion.objects.filter(name=name).first()
        try:
            if existing is None or o["checkpoint"] is not None:
                checkpoint = o["checkpoint"] or str(self.bootstrap(o["seconds"]))
                existing = policy_register(name=name, checkpoint=checkpoint, tokenizer=o["tokenizer"], kind="sft",
                                           prompt_format=o["prompt_format"])  # fmt: skip
            policy_make_current(version=existing, force=True)
        except AnnotationError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"demo policy {name!r} is current ({existing.checkpoint_uri}): written prompts are answered by it")

    def bootstrap(self, seconds: float) -> Path:
        from training.bootstrap import BootstrapConfig, bootstrap_policy

        out = Path(settings.VAR_DIR) / "demo"
        policy = out / "policy"
        if (policy / "params.json").is_file():
            return policy
        data = json.loads(DEMO.read_text())
        dialogues = out / "dialogues.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        with dialogues.open("w", encoding="utf-8") as f:
            for c in data["comparisons"]:
                turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(c["dialogue"])]
                for answer in (c["a"], c["b"]):  # both answers: the demo policy should write either kind
                    f.write(json.dumps({"dialogue": turns, "response": answer}, ensure_ascii=False) + "\n")
        self.stderr.write(f"training a tiny demo policy from scratch on {len(data['comparisons'])} dialogues "
                          f"(~{seconds:.0f} s)")  # fmt: skip
        result = bootstrap_policy(BootstrapConfig(out_dir=str(policy), texts=[str(dialogues)], seconds=seconds))
        self.stderr.write(f"demo policy: {result.parameters} parameters, {result.steps} steps, loss {result.final_loss:.3f}")
        return policy
