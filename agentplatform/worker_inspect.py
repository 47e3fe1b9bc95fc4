"""A worker's configuration as remote control shows it (Flower's worker page), with every secret masked.

Celery takes its configuration from Django's settings, so `celery inspect conf` (what Flower's worker
page and `/api/workers` show) and `celery inspect report` carry every Django setting. Celery's own
censoring masks the values of secret-looking names and the broker URL, but it recurses into
dictionaries before looking at their names and knows nothing of our URLs: `REDIS_URL`, the cache's
`LOCATION` and the database's host, user and name went out as they are. The two commands are
registered again here, by their names, with the censoring below; the worker imports this module
with the Celery app.
"""

import re
from collections.abc import Mapping
from typing import Any

from celery.app.utils import HIDDEN_SETTINGS
from celery.utils.serialization import jsonify
from celery.utils.text import pretty
from celery.worker.control import inspect_command, ok
from kombu.utils.encoding import safe_repr
from kombu.utils.url import sanitize_url

MASK = "********"
# Celery's names of secret settings, and ours: Flower's credentials, anything called a credential or a DSN.
SECRET_NAME = re.compile(f"{HIDDEN_SETTINGS.pattern}|AUTH|CREDENTIAL|PRIVATE|DSN", re.IGNORECASE)


def url_censored(value: str) -> str:
    """A URL, or a `;`-separated failover list of them, with each password masked."""
    censored = []
    for url in value.split(";"):
        try:
            censored.append(sanitize_url(url, mask=MASK) if "://" in url else url)
        except ValueError:
            # Not a URL after all (or one that cannot be parsed): nothing of it is shown.
            return MASK
    return ";".join(censored)


def value_censored(value: Any) -> Any:
    """A setting's value with the password of every URL in it masked, however deep."""
    if isinstance(value, Mapping):
        return settings_censored(value)
    if isinstance(value, list | tuple):
        return type(value)(value_censored(item) for item in value)
    if isinstance(value, str) and "://" in value:
        return url_censored(value)
    return value


def settings_censored(settings: Mapping) -> dict:
    """Settings as they may be shown: a secret-looking name hides its whole value, a dictionary
    included (so `DATABASES` shows neither host, user, name nor password), and URLs lose their passwords.
    """
    return {
        key: MASK if isinstance(key, str) and SECRET_NAME.search(key) else value_censored(value)
        for key, value in settings.items()
    }


def settings_report(settings: Mapping) -> str:
    """Censored settings as `celery report` lists them, one `NAME: value` per line."""
    return "\n".join(f"{key}: {pretty(value, width=50)}" for key, value in settings_censored(settings).items())


@inspect_command()
def conf(state: Any, with_defaults: bool = False, **kwargs: Any) -> dict:
    """List configuration (secrets masked)."""
    table = state.app.conf.table(with_defaults=with_defaults, censored=False)
    return jsonify(
        settings_censored(table),
        keyfilter=lambda key: isinstance(key, str) and not key.startswith("__"),
        unknown_type_filter=safe_repr,
    )


@inspect_command()
def report(state: Any) -> dict:
    """Information about Celery installation for bug reports (secrets masked)."""
    # Celery's report is a header (versions, platform, transport with its password masked), a blank
    # line, then the settings; only the header is kept, and the settings are listed censored.
    header = state.app.bugreport().strip("\n").split("\n\n", 1)[0]
    return ok(f"{header}\n\n{settings_report(state.app.conf.table(censored=False))}\n")
