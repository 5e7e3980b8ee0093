"""Celery tasks of the training side (the `gpu` queue, routed by the `training.` prefix). Thin: an id in, one
function (training.runs, training.model_worker), rows out. torch is imported inside the functions they call, never
when the web process loads this module."""

from celery import shared_task


@shared_task(name="training.execute_run", bind=True, acks_late=True)
def execute_run_task(self, run_id: int) -> str:
    """Execute any kind of run; a message for a run another worker holds, or one that is done, does nothing."""
    from training.runs import execute_run

    return execute_run(run_id, task_id=self.request.id or "")


@shared_task(name="training.fill_responses", acks_late=True)
def fill_responses_task() -> dict:
    """The model worker: the current policy answers every comparison waiting for responses."""
    from training.model_worker import fill_awaiting

    return fill_awaiting()
