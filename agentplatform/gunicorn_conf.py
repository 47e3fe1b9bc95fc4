"""gunicorn's settings file for the web process (the Procfile passes it with `--config python:…`)."""

import gc
import os
import socket

from prometheus_client.multiprocess import mark_process_dead


def child_exit(server, worker) -> None:
    # prometheus-client's bookkeeping for a web process that left: its live gauges must stop counting.
    # Its files are named as agentplatform.metrics.process_file_id names them (kept free of Django here,
    # since gunicorn's master process loads this file).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(f"{socket.gethostname().replace('_', '-')}-{worker.pid}")


def post_worker_init(worker) -> None:
    # What the loaded app holds lives as long as the process. Frozen, the garbage collector stops walking
    # it on every full collection, a pause that grows with everything the process holds.
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 (imports the views and all they use, to be frozen too)
    gc.freeze()
