"""Celery tasks for reward models (the `gpu` queue). Thin: ids in, one function, rows out.

torch is imported inside the task (through training.runs), never when the web process loads this module.
"""

from celery import shared_task


@shared_task(name="rewards.train_reward_model", bind=True, acks_late=True)
def train_reward_model_task(self, run_id: int) -> int:
    """Run a reward-model TrainingRun (as `training.execute_run` does any run); a re-delivered message finds it
    held or done and does nothing."""
    from training.runs import execute_run

    execute_run(run_id, task_id=self.request.id or "")
    return run_id
