from django.apps import AppConfig


class AgentsAppConfig(AppConfig):
    name = "agents_app"
    verbose_name = "Agents"

    def ready(self):
        from control_plane import q_workers

        from .hosts import signals as host_signals

        # Host operations run as django-q2 jobs in forked workers, which need their own database pool.
        q_workers.connect()
        host_signals.connect()
