"""Health checks of pooled PostgreSQL connections that cost a round trip only when one can tell something.

Every web request and every Celery task takes a connection from the pool and hands it back. Checking
each one as it is taken (Django's `CONN_HEALTH_CHECKS` with a pool) adds a `SELECT 1` to every request
and task. A connection handed back healthy a moment ago is almost surely healthy still, so, as HikariCP
does, the check is skipped within POOL_CHECK_BYPASS_SECONDS of the connection's last return; after a
longer idle time (when a restarted server or a dropped socket may have broken it) it is checked.
"""

import time

# Within this many seconds of its last return to the pool, a connection is handed out unchecked.
POOL_CHECK_BYPASS_SECONDS = 0.5


def pooled_connection_returned(connection) -> None:
    """Note that the connection is being handed back to the pool, healthy as far as its user knows."""
    connection._agentplatform_returned_at = time.monotonic()


def pooled_connection_check(connection) -> None:
    """The pool's `check` callback: raises (so the pool discards the connection) if a check fails."""
    returned = getattr(connection, "_agentplatform_returned_at", None)
    if returned is not None and time.monotonic() - returned < POOL_CHECK_BYPASS_SECONDS:
        return
    from psycopg_pool import ConnectionPool

    ConnectionPool.check_connection(connection)
