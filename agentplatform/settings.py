"""Settings for agentplatform: every knob is read from the environment here, with a safe local default."""

import os
import tempfile
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_header(name: str) -> tuple[str, str] | None:
    """`Header-Name,value` as Django's (request.META key, value) pair; None when unset."""
    items = env_list(name)
    if not items:
        return None
    if len(items) != 2:
        raise ImproperlyConfigured(f"{name} must be a header name and its value separated by a comma")
    header, value = items
    key = header.upper().replace("-", "_")
    return (key if key.startswith("HTTP_") else f"HTTP_{key}", value)


DEBUG = env_bool("DEBUG", False)
# Sessions, CSRF tokens and password-reset links are signed with this key. Only a DEBUG process falls
# back on a key anyone can read here; any other refuses to start without its own (`make up` generates
# one and keeps it in DATA_DIR).
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set: set it to a long random string (DEBUG=true runs with a local key instead)"
        )
    SECRET_KEY = "insecure-debug-only-key"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# HTTPS. All off by default: the platform as `make up` runs it answers plain HTTP on loopback. A
# deployment served over TLS turns them on (`manage.py check --deploy` then has nothing to say).
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
# Behind a proxy that ends TLS: the header it sets on HTTPS requests and that header's value there
# ("X-Forwarded-Proto,https"). Only for a proxy that always sets or strips the header itself.
SECURE_PROXY_SSL_HEADER = env_header("SECURE_PROXY_SSL_HEADER")
# Probes ask over plain HTTP, from inside the deployment.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "scheduling",
    "caching",
    "agents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "agentplatform.urls"
WSGI_APPLICATION = "agentplatform.wsgi.application"
ASGI_APPLICATION = "agentplatform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Embedded default: an SQLite file under the project. Production and tests use PostgreSQL.
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var")))
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'agentplatform.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
        conn_health_checks=True,
    )
}
POSTGRESQL = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
if POSTGRESQL and env_bool("DATABASE_POOL", True):
    # Each web request and each Celery task closes its connection (Celery's Django fixup does so
    # after every task); with a pool, closing hands the connection back instead of ending it.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("DATABASE_POOL_MIN_SIZE", 1),
        "max_size": env_int("DATABASE_POOL_MAX_SIZE", 10),
        # A request that finds every connection busy for this long fails rather than hangs.
        "timeout": env_float("DATABASE_POOL_TIMEOUT", 30),
    }
    # Django's backend, but for a pool that checks a connection only after it sat idle (agentplatform/postgresql).
    DATABASES["default"]["ENGINE"] = "agentplatform.postgresql"
if POSTGRESQL:
    # Workers run with "off" (see the Procfile): their run-state writes need not wait for the WAL
    # flush. A PostgreSQL crash may then forget their last fraction of a second of claims and
    # finishes, which the sweeper redoes (runs are at-least-once); submissions stay synchronous.
    synchronous_commit = env_str("DATABASE_SYNCHRONOUS_COMMIT", "on")
    DATABASES["default"].setdefault("OPTIONS", {})["options"] = f"-c synchronous_commit={synchronous_commit}"
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, three workers and beat write to one file: WAL lets readers proceed during a write,
    # IMMEDIATE takes the write lock up front instead of failing on upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# Redis: broker, pub-sub bus and caches. Every key and channel carries REDIS_KEY_PREFIX.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_KEY_PREFIX = env_str("REDIS_KEY_PREFIX", "ap:")

# Celery (read by agentplatform/celery.py through the CELERY_ namespace).
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_TIMEZONE = TIME_ZONE
WORKER_SEND_TASK_EVENTS = env_bool("WORKER_SEND_TASK_EVENTS", False)
# Tasks a worker process runs between closing its database connections (see agentplatform/celery.py).
WORKER_DB_REUSE_MAX = env_int("WORKER_DB_REUSE_MAX", 1000)

# Server-Sent Events are served by the ASGI `events` process; the WSGI web process redirects to it.
EVENTS_URL = env_str("EVENTS_URL", f"http://127.0.0.1:{env_int('EVENTS_PORT', 8001)}")
# A comment line is sent on a quiet stream this often, so proxies and clients keep it open.
EVENTS_KEEPALIVE_SECONDS = env_float("EVENTS_KEEPALIVE_SECONDS", 15)

# Agent topics ride Redis Streams: each keeps about this many messages (0: no limit) and none much
# older than this (0: no limit), whether dispatched or not.
TOPIC_STREAM_MAXLEN = env_int("TOPIC_STREAM_MAXLEN", 100_000)
TOPIC_STREAM_MAX_AGE_SECONDS = env_float("TOPIC_STREAM_MAX_AGE_SECONDS", 7 * 86400)
# A message a dispatcher has held this long unacknowledged (it died, or the message's runs could not
# be stored) is claimed by a dispatcher, and every dispatcher looks for such messages this often.
TOPIC_CLAIM_IDLE_SECONDS = env_float("TOPIC_CLAIM_IDLE_SECONDS", 60)
TOPIC_CLAIM_INTERVAL_SECONDS = env_float("TOPIC_CLAIM_INTERVAL_SECONDS", 15)

# Agents: modules imported by the registry besides the built-ins and every app's agents.py.
AGENT_MODULES = env_list("AGENT_MODULES")
# A change to an agent's tuning (tier, SLA, limits, enabled) reaches the submissions of every process
# within this many seconds; the process where it was made sees it at once. 0 reads it on every submission.
AGENT_TUNING_CACHE_SECONDS = env_float("AGENT_TUNING_CACHE_SECONDS", 1.0)

# Runs
RUN_MAX_INPUT_BYTES = env_int("RUN_MAX_INPUT_BYTES", 1024 * 1024)
RUN_BATCH_MAX_ITEMS = env_int("RUN_BATCH_MAX_ITEMS", 1000)
RUN_BATCH_MAX_BYTES = env_int("RUN_BATCH_MAX_BYTES", 16 * 1024 * 1024)
# Deepest nesting of arrays and objects in a run's input (the input object itself is level 1).
RUN_INPUT_MAX_DEPTH = env_int("RUN_INPUT_MAX_DEPTH", 64)
RUN_WAIT_MAX_SECONDS = env_float("RUN_WAIT_MAX_SECONDS", 30)
# The tree view lists at most this many runs of a tree (and says when it holds more).
RUN_TREE_MAX_RUNS = env_int("RUN_TREE_MAX_RUNS", 10_000)
# Runs dispatched together travel together: one message carries up to this many run ids of one tier.
RUN_MESSAGE_MAX_RUNS = env_int("RUN_MESSAGE_MAX_RUNS", 100)
# A lone run's message is sent while its row is inserted, and a worker that gets it before the row is
# committed waits this long for the row before it drops the message (the sweeper sends a run it finds
# without one). Off, every message is sent once its runs are committed.
RUN_MESSAGE_AHEAD = env_bool("RUN_MESSAGE_AHEAD", True)
RUN_MESSAGE_AHEAD_WAIT_SECONDS = env_float("RUN_MESSAGE_AHEAD_WAIT_SECONDS", 1.0)
# A worker runs a message's runs one after another; once this long has passed, it hands the runs it
# has not started back to the queue (in two messages, so that other processes share them).
RUN_MESSAGE_SLICE_SECONDS = env_float("RUN_MESSAGE_SLICE_SECONDS", 0.1)
# A claimed run is the worker's for this long; the worker's heartbeat renews the lease of every run it
# holds each RUN_HEARTBEAT_SECONDS, so a dead worker's runs are claimed again within about a lease.
RUN_LEASE_SECONDS = env_float("RUN_LEASE_SECONDS", 30)
RUN_HEARTBEAT_SECONDS = env_float("RUN_HEARTBEAT_SECONDS", 10)
# How often a worker's main process looks for an agent past its run's hard time limit (and kills it).
RUN_WATCHDOG_SECONDS = env_float("RUN_WATCHDOG_SECONDS", 0.1)
# Where a pool process keeps the outcomes it has reached but not yet written (a tmpfs by default): if it
# dies, its worker's main process records them, so no finished run runs again.
RUN_SPOOL_DIR = env_str("RUN_SPOOL_DIR", "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
# A run whose worker died goes back to the queue without spending a retry, this many times at most:
# a run that keeps killing its workers then fails instead of taking the pool down forever.
RUN_LOST_ATTEMPTS_MAX = env_int("RUN_LOST_ATTEMPTS_MAX", 3)
# A worker whose database does not answer retries its writes, waiting up to this long between tries.
RUN_WRITE_RETRY_MAX_SECONDS = env_float("RUN_WRITE_RETRY_MAX_SECONDS", 2)
# Celery's own hard limit of a message, a backstop to the watchdog, leaves this long for its outcomes to
# be written through a database outage before it kills the process (whose spool then still holds them).
RUN_WRITE_ALLOWANCE_SECONDS = env_float("RUN_WRITE_ALLOWANCE_SECONDS", 300)
# Admission: queued runs per tier beyond which submissions get 429 (an agent may set its own limit).
TIER_BACKLOG_LIMITS = {
    "critical": env_int("TIER_BACKLOG_LIMIT_CRITICAL", 2_000),
    "standard": env_int("TIER_BACKLOG_LIMIT_STANDARD", 20_000),
    "batch": env_int("TIER_BACKLOG_LIMIT_BATCH", 50_000),
}
# Batch is refused while critical or standard is past this share of its limit, so batch hits its limit first.
ADMISSION_BATCH_YIELD_FRACTION = env_float("ADMISSION_BATCH_YIELD_FRACTION", 0.5)
# One user's queued runs of a tier may fill at most this share of the tier's limit, so others still get in.
BACKLOG_USER_SHARE = env_float("BACKLOG_USER_SHARE", 0.5)
# Retry-After is the excess backlog over the tier's finish rate in this recent window.
ADMISSION_DRAIN_WINDOW_SECONDS = env_int("ADMISSION_DRAIN_WINDOW_SECONDS", 60)
# A standard run still queued after this share of its SLA is also dispatched on the critical queue,
# as long as the critical pool has idle processes: the Procfile starts the critical worker with this
# many (escalation counts critical runs queued and running against it).
ESCALATION_SLA_FRACTION = env_float("ESCALATION_SLA_FRACTION", 0.5)
WORKER_CONCURRENCY_CRITICAL = env_int("WORKER_CONCURRENCY_CRITICAL", 4)
# The sweeper: how often it runs; how long a queued run settles, and then must be found without a
# message on every pass, before it is sent again; and how old a message's marker may grow before the
# sweeper reads the broker to see whether the message is still there.
SWEEP_INTERVAL_SECONDS = env_float("SWEEP_INTERVAL_SECONDS", 5)
SWEEP_QUEUED_AFTER_SECONDS = env_float("SWEEP_QUEUED_AFTER_SECONDS", 10)
# A message can be lost without a trace (taken by a worker at the instant it was killed): a minute bounds
# how long its runs wait before the sweeper reads the broker and sends them again.
SWEEP_MESSAGE_OVERDUE_SECONDS = env_float("SWEEP_MESSAGE_OVERDUE_SECONDS", 60)
SWEEP_BATCH = env_int("SWEEP_BATCH", 1000)
RETRY_BACKOFF_BASE_SECONDS = env_float("RETRY_BACKOFF_BASE_SECONDS", 1.0)
RETRY_BACKOFF_MAX_SECONDS = env_float("RETRY_BACKOFF_MAX_SECONDS", 300.0)
# What an agent logs through ctx.logger is kept with its run, up to this many bytes (the rest is cut).
RUN_LOG_MAX_BYTES = env_int("RUN_LOG_MAX_BYTES", 64 * 1024)
# Finished runs are deleted once they finished this many days ago (0: kept forever), in batches of
# RUN_PURGE_BATCH rows, each its own short transaction.
RUN_RETENTION_DAYS = env_int("RUN_RETENTION_DAYS", 30)
RUN_PURGE_BATCH = env_int("RUN_PURGE_BATCH", 1000)
RUN_PURGE_INTERVAL_SECONDS = env_float("RUN_PURGE_INTERVAL_SECONDS", 600)

# Django refuses a body before our own limits can answer 413 with a field-level message.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(RUN_MAX_INPUT_BYTES, RUN_BATCH_MAX_BYTES) + 64 * 1024

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first, so that a request without credentials answers 401 with WWW-Authenticate. The
        # token's query also reads the critical-tier permission, for submissions.
        "agents.api.authentication.CriticalAwareTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": env_int("API_PAGE_SIZE", 50),
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "agents.api.errors.exception_handler",
}
# A token (its user, active or not, and their critical-tier permission) is read from the database at most
# this often per process; a change made in the process itself applies at once. 0 reads it on every request.
API_TOKEN_CACHE_SECONDS = env_float("API_TOKEN_CACHE_SECONDS", 1.0)
# Runs each user may submit through the API ("N/second|minute|hour|day"), counted in Redis.
API_SUBMIT_RATE = env_str("API_SUBMIT_RATE", "6000/minute")

# Metrics and probes. /metrics answers `Authorization: Bearer <METRICS_TOKEN>` alone, and nobody while it
# is unset. prometheus-client reads PROMETHEUS_MULTIPROC_DIR itself: set, every process counts into that
# directory and a scrape adds them up. /readyz gives up on a check after READY_TIMEOUT_SECONDS.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
METRICS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR", "")
READY_TIMEOUT_SECONDS = env_float("READY_TIMEOUT_SECONDS", 2.0)

# Django's shared cache lives in Redis under the deployment's prefix.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": REDIS_KEY_PREFIX + "cache",
    }
}

# Memoized computation (caching/memoize.py): the default bounds of each memoized function's LRU in
# every process, and how soon the lock of a computation lapses once its process stops renewing it
# (it renews every third of it), which is how long waiters may sit behind a process that died.
MEMO_LRU_MAX_ENTRIES = env_int("MEMO_LRU_MAX_ENTRIES", 1000)
MEMO_LRU_MAX_BYTES = env_int("MEMO_LRU_MAX_BYTES", 16 * 1024 * 1024)
MEMO_LOCK_TTL_SECONDS = env_float("MEMO_LOCK_TTL_SECONDS", 5.0)

SPECTACULAR_SETTINGS = {
    "TITLE": "agentplatform API",
    "DESCRIPTION": "Submit and follow agent runs.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Served from this deployment, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "agents.api.schema.request_bodies_as_validated",
    ],
}
