"""What the run-starting commands share: create the run (checked as the API checks it), then run it here or queue it."""

from django.core.management.base import CommandError

from annotation.services.errors import AnnotationError
from annotation.services.runs import run_create, run_send


def start(command, *, kind: str, params: dict, queue: bool) -> int:
    """Create a run of `kind`; with `queue`, send it to a worker, else execute it in this process with a progress
    line on stderr. Returns the run's id; a failure is a CommandError with the run's error."""
    try:
        run = run_create(kind=kind, params={k: v for k, v in params.items() if v is not None}, send=False)
    except AnnotationError as exc:
        raise CommandError(exc.message) from None
    if queue:
        run_send(run)
        command.stdout.write(f"queued {kind} run {run.pk}")
        return run.pk
    from training.runs import execute_run

    command.stderr.write(f"running {kind} run {run.pk} in this process")
    status = execute_run(run.pk)
    run.refresh_from_db()
    if status != "succeeded":
        raise CommandError(f"{kind} run {run.pk} {status}: {run.error}")
    made = run.policy_version or run.reward_model_version
    command.stdout.write(f"{kind} run {run.pk} succeeded" + (f": {made.name}" if made else ""))
    return run.pk
