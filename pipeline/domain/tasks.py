"""Names of the Celery queues and tasks: the contract between the scheduler, the workers and whoever enqueues.

A task takes ids only (JSON): ``retrain_users(user_ids)``, ``retrain_user(user_id)``, ``gate(revision_id)``,
``gate_many(revision_ids)``.
"""

from __future__ import annotations

from typing import Final

TRAIN_QUEUE: Final = "train"
EVALUATE_QUEUE: Final = "evaluate"
PUBLISH_QUEUE: Final = "publish"
QUEUES: Final = (TRAIN_QUEUE, EVALUATE_QUEUE, PUBLISH_QUEUE)

#: Retrain a batch of users together (the scheduler's task).
RETRAIN_USERS: Final = "persona.train.retrain_users"
#: Retrain one user (an operator's manual enqueue).
RETRAIN_USER: Final = "persona.train.retrain_user"
#: Judge a candidate revision and promote it if it passes (chained after each candidate of a one-user retrain).
GATE: Final = "persona.evaluate.gate"
#: Judge the candidates of one training batch together (one pass over the base), each decided on its own.
GATE_MANY: Final = "persona.evaluate.gate_many"
