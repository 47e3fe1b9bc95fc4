from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Agents"

    def ready(self) -> None:
        from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
        from django.db.models.signals import post_migrate

        from agents.runs.lease import heartbeat_on_worker_ready
        from agents.runs.worker_stop import (
            cancel_on_worker_shutting_down,
            consumer_on_worker_ready,
            hand_back_on_worker_shutdown,
            spools_recorded_on_worker_ready,
        )
        from agents.sync import sync_on_migrate, sync_on_worker_ready

        post_migrate.connect(sync_on_migrate, sender=self)
        worker_ready.connect(sync_on_worker_ready, weak=False)
        worker_ready.connect(heartbeat_on_worker_ready, weak=False)
        # A worker told to stop hands the runs in progress back to the queue instead of waiting for them.
        worker_ready.connect(consumer_on_worker_ready, weak=False)
        # What a worker killed whole had finished is recorded by the next of its name.
        worker_ready.connect(spools_recorded_on_worker_ready, weak=False)
        worker_shutting_down.connect(cancel_on_worker_shutting_down, weak=False)
        worker_shutdown.connect(hand_back_on_worker_shutdown, weak=False)
