"""Celery tasks: thin, explicitly named, ids in, retries only for listed exceptions."""
