"""Run the topic dispatcher until SIGTERM or SIGINT."""

import signal
import threading

from django.core.management.base import BaseCommand

from agents.topics import topic_dispatcher_serve


class Command(BaseCommand):
    help = "Submit one run of each reacting agent per message published on an agent topic."

    def handle(self, *args, **options) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        topic_dispatcher_serve(stop)
