"""The dotted path django-q2 stored for host operations queued before hosts moved into agents_app/hosts/:
such a job, still in the queue after an upgrade, finds its function here."""

from agents_app.hosts.jobs import run_batch_job  # noqa: F401
