from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Agents"

    def ready(self) -> None:
        from celery.signals import worker_ready
        from django.db.models.signals import post_migrate

        from agents.runs.lease import heartbeat_on_worker_ready
        from agents.sync import sync_on_migrate, sync_on_worker_ready

        post_migrate.connect(sync_on_migrate, sender=self)
        worker_ready.connect(sync_on_worker_ready, weak=False)
        worker_ready.connect(heartbeat_on_worker_ready, weak=False)
