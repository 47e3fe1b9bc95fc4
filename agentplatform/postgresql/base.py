"""Django's PostgreSQL backend, whose connection pool checks a connection only when it has been idle.

Django checks every pooled connection it takes when `CONN_HEALTH_CHECKS` is on, and not at all when it
is off; this backend's pool checks as agentplatform/database_pool.py decides. Everything else is
Django's own backend.
"""

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLDatabaseWrapper

from agentplatform.database_pool import pooled_connection_check, pooled_connection_returned


class DatabaseWrapper(PostgreSQLDatabaseWrapper):
    @property
    def pool(self):
        pool_options = self.settings_dict["OPTIONS"].get("pool")
        if not pool_options or self.alias == NO_DB_ALIAS:
            return None
        if self.alias not in self._connection_pools:
            if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
                raise ImproperlyConfigured("Pooling doesn't support persistent connections.")
            from psycopg_pool import ConnectionPool

            connect_kwargs = self.get_connection_params()
            # Autocommit until Django sets it, as Django's own pool does.
            connect_kwargs["autocommit"] = True
            pool = ConnectionPool(
                kwargs=connect_kwargs,
                open=False,
                configure=self._configure_connection,
                check=pooled_connection_check,
                **({} if pool_options is True else pool_options),
            )
            # The first of several threads creating it at once wins, as in Django.
            self._connection_pools.setdefault(self.alias, pool)
        return self._connection_pools[self.alias]

    def _close(self):
        # Noted here, not by a `reset` callback of the pool: the pool runs those on a thread of its own, so
        # a connection would come back later than Django hands it back.
        if self.connection is not None and self.pool:
            pooled_connection_returned(self.connection)
        super()._close()
