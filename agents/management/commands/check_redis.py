"""Fail in one line when Redis (the bus, the caches and, by default, the broker) does not answer."""

from urllib.parse import urlsplit, urlunsplit

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

CONNECT_TIMEOUT_SECONDS = 2.0
HOW_TO_START = "redis-server --daemonize yes --port 6379"


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Command(BaseCommand):
    help = "Ping REDIS_URL (and CELERY_BROKER_URL when it is another Redis); exit 1 with one line if one is down."

    def handle(self, *args, **options) -> None:
        urls = dict.fromkeys([settings.REDIS_URL, settings.CELERY_BROKER_URL])
        for url in urls:
            if not url.startswith(("redis://", "rediss://", "unix://")):
                continue
            try:
                redis.Redis.from_url(
                    url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS, socket_timeout=CONNECT_TIMEOUT_SECONDS
                ).ping()
            except redis.RedisError as exc:
                reason = " ".join(str(exc).split())
                raise CommandError(
                    f"Redis is not reachable at {without_password(url)} ({reason}); start one with: {HOW_TO_START}"
                ) from exc
        if options["verbosity"] > 1:
            self.stdout.write(f"Redis answers at {', '.join(without_password(url) for url in urls)}")
