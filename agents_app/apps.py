from django.apps import AppConfig

FORGET_CHECK_S = 60.0


class AgentsAppConfig(AppConfig):
    name = "agents_app"
    verbose_name = "Agents"

    def ready(self):
        from django.conf import settings
        from django.db.models.signals import post_migrate

        from control_plane import q_workers
        from tasks_app import hub

        from . import registry
        from .hosts import jobs, views
        from .hosts import signals as host_signals

        # Host operations run as django-q2 jobs in forked workers, which need their own database pool.
        q_workers.connect()
        host_signals.connect()
        # The hosts page is live on the dashboard's websocket, and its stale operations are failed by every
        # server process's sweeper (a queued one no cluster will pick up) and by the cluster's schedule.
        views.add_live_page()
        hub.add_sweep(jobs.abandon_stale_operations, settings.CP_HOST_STALE_CHECK_S)
        post_migrate.connect(jobs.ensure_schedule, sender=self)
        # Agents offline for CP_AGENT_FORGET_DAYS are forgotten by the same sweepers (a minute is plenty for
        # a threshold in days; tasks_app.jobs.sweep_job is the cluster's backstop).
        hub.add_sweep(registry.forget_absent_agents, FORGET_CHECK_S)
