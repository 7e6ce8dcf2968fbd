from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    name = "tasks_app"
    verbose_name = "Runs and tasks"

    def ready(self):
        from django.db.models.signals import post_migrate

        from . import jobs

        post_migrate.connect(jobs.ensure_schedules, sender=self)
