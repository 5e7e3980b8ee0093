"""Celery tasks for reward models (the `gpu` queue). Thin: ids in, one function, rows out.

torch is imported inside the task (through rewards.runs), never when the web process loads this module.
"""

from celery import shared_task


@shared_task(name="rewards.train_reward_model", acks_late=True)
def train_reward_model_task(run_id: int) -> int:
    """Run a queued TrainingRun; a re-delivered message finds it no longer queued and does nothing."""
    from annotation.models import RunStatus, TrainingRun
    from rewards.runs import reward_run_execute

    if not TrainingRun.objects.filter(pk=run_id, status=RunStatus.QUEUED).exists():
        return run_id
    reward_run_execute(run_id)
    return run_id
