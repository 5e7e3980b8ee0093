import json
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from annotation.models import AnnotatorProfile, Batch, Guideline, PolicyVersion, Role
from annotation.services.imports import ComparisonRecord, ResponseRecord, comparisons_store

DEMO = Path(__file__).resolve().parents[2] / "demo_data.json"
USERS = [
    ("admin", Role.ADMIN, True, True),
    ("researcher", Role.RESEARCHER, True, True),
    ("reviewer", Role.REVIEWER, True, True),
    ("annotator1", Role.ANNOTATOR, True, False),
    ("annotator2", Role.ANNOTATOR, True, True),
]
PASSWORD = "demo-password"  # a laptop demo only; refused under the production settings (ALLOW_DEMO_DATA)


class Command(BaseCommand):
    help = "Load demo users, policies, guidelines and comparisons written for the demo (idempotent)."

    def handle(self, *args, **options):
        # Before the database is touched: the demo's admin has a published password.
        if not settings.ALLOW_DEMO_DATA:
            raise CommandError("load_demo creates users with a published password; refused under these settings.")
        self.load()

    @transaction.atomic
    def load(self):
        data = json.loads(DEMO.read_text())
        user_model = get_user_model()
        for name, role, helpful, safety in USERS:
            user, created = user_model.objects.get_or_create(
                username=name, defaults={"is_staff": role == Role.ADMIN, "is_superuser": role == Role.ADMIN}
            )
            if created:
                user.set_password(PASSWORD)
                user.save()
            AnnotatorProfile.objects.update_or_create(
                user=user, defaults={"role": role, "skill_helpfulness": helpful, "skill_safety": safety}
            )
        for p in data["policies"]:
            PolicyVersion.objects.get_or_create(
                name=p["name"],
                defaults={
                    "kind": p["kind"],
                    "parent": PolicyVersion.objects.filter(name=p.get("parent")).first(),
                    "is_current": p.get("current", False),
                },
            )
        admin = user_model.objects.get(username="admin")
        for domain, text in data["guidelines"].items():  # an admin's later edits are kept
            Guideline.objects.get_or_create(domain=domain, defaults={"text": text, "updated_by": admin})
        batch, created = Batch.objects.get_or_create(
            name="demo-week-1", defaults={"overlap": 2, "too_fast_seconds": 3}
        )
        if created:
            records = []
            for n, c in enumerate(data["comparisons"]):
                first = ResponseRecord(c["a"], "RLHF-V1", {"temperature": 0.6, "top_p": 0.9})
                second = ResponseRecord(c["b"], "Llama-2-7b-SFT", {"temperature": 1.0, "top_p": 0.9})
                a, b = (first, second) if n % 2 == 0 else (second, first)  # no position bias in the demo
                records.append(
                    ComparisonRecord(
                        turns=tuple(
                            ("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(c["dialogue"])
                        ),
                        response_a=a,
                        response_b=b,
                        domain=c["domain"],
                        risk_category=c.get("risk_category", ""),
                        source="demo",
                    )
                )
            comparisons_store(batch=batch, records=records)
        self.stdout.write(
            f"demo ready: users {', '.join(u[0] for u in USERS)} (password {PASSWORD!r}), batch {batch.name!r}"
        )
