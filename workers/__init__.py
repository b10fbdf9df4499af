"""Process entry points: the Celery application and its tasks, the training worker and the scheduler (beat).

`python -m workers worker` and `python -m workers beat` are what `persona worker` and `persona beat` run.
"""
