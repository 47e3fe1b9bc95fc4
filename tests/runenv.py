"""Gives each test run its own PostgreSQL database and Redis key prefix (loaded before settings)."""

import atexit
import os
import secrets
import shutil
import tempfile
import uuid

RUN_ID = os.environ.setdefault("TEST_RUN_ID", uuid.uuid4().hex[:10])

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
# Django creates and drops test_<NAME>; the suffix keeps concurrent runs apart.
os.environ["DATABASE_URL"] = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + f"/agentplatform_{RUN_ID}"
os.environ["REDIS_KEY_PREFIX"] = f"aptest:{RUN_ID}:"
# Settings refuse to load without a key while DEBUG is off, as in production; each run makes its own.
os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
os.environ.setdefault("AGENT_MODULES", "tests.sample_agents")
# Every test starts from agents synced anew (a transactional test empties the table, and their ids change),
# so no process of the run may hold on to rows read in an earlier test; tests of the cache turn it on.
os.environ.setdefault("AGENT_TUNING_CACHE_SECONDS", "0")
# Likewise users and tokens: tests change them with queryset updates, which send no signal.
os.environ.setdefault("API_TOKEN_CACHE_SECONDS", "0")
os.environ.setdefault("RETRY_BACKOFF_BASE_SECONDS", "0.05")
os.environ.setdefault("RETRY_BACKOFF_MAX_SECONDS", "0.5")
# Short leases renewed often: a run longer than its lease must live on its workers' heartbeats.
os.environ.setdefault("RUN_LEASE_SECONDS", "3")
os.environ.setdefault("RUN_HEARTBEAT_SECONDS", "0.5")
# prometheus-client's multiprocess mode, as `make up` runs it: every process of this run (workers included)
# counts into one directory of its own, set before anything imports prometheus-client.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=f"agentplatform-metrics-{RUN_ID}-")
atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
