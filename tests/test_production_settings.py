"""Production settings from the environment alone: no fallback key without DEBUG, HTTPS when asked,
and `check --deploy` with nothing to say. Each case runs in a process of its own, as a deployment would."""

import json
import os
import secrets
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PRODUCTION = {
    "DEBUG": "false",
    "ALLOWED_HOSTS": "agents.example.com,testserver",
    "SECURE_SSL_REDIRECT": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "SECURE_HSTS_PRELOAD": "true",
    "SESSION_COOKIE_SECURE": "true",
    "CSRF_COOKIE_SECURE": "true",
    "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto,https",
}
# What a request through the TLS proxy and one around it get (run inside the configured process).
REQUESTS = """
import json
from django.test import Client

client = Client()
plain = client.get("/admin/login/")
proxied = client.get("/admin/login/", headers={"X-Forwarded-Proto": "https"})
print(json.dumps({
    "plain": [plain.status_code, plain.get("Location")],
    "proxied": [proxied.status_code, proxied.get("Strict-Transport-Security")],
    "csrf_cookie_secure": bool(proxied.cookies["csrftoken"]["secure"]),
}))
"""


def manage(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    """Run manage.py with this run's environment, less every variable set here (None removes one)."""
    environment = {name: value for name, value in os.environ.items() if name not in {*PRODUCTION, *env}}
    environment.update({name: value for name, value in env.items() if value is not None})
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_check_deploy_has_nothing_to_say_with_the_production_variables():
    done = manage("check", "--deploy", "--fail-level", "WARNING", SECRET_KEY=secrets.token_urlsafe(50), **PRODUCTION)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout
    assert "WARNING" not in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("secret_key", [None, ""])
def test_without_a_secret_key_a_process_without_debug_refuses_to_start_naming_the_variable(secret_key):
    redis_password, database_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    done = manage(
        "check",
        SECRET_KEY=secret_key,
        DEBUG="false",
        REDIS_URL=f"redis://:{redis_password}@127.0.0.1:6379/0",
        DATABASE_URL=f"postgres://platform:{database_password}@127.0.0.1:5432/agents",
    )

    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is not set" in output
    assert redis_password not in output
    assert database_password not in output


@pytest.mark.slow
def test_a_debug_process_runs_without_a_secret_key():
    done = manage("check", SECRET_KEY=None, DEBUG="true")

    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_behind_a_tls_proxy_plain_http_is_redirected_and_https_gets_hsts_and_secure_cookies():
    done = manage("shell", "-c", REQUESTS, SECRET_KEY=secrets.token_urlsafe(50), **PRODUCTION)

    assert done.returncode == 0, done.stdout + done.stderr
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers["plain"] == [301, "https://testserver/admin/login/"]
    assert answers["proxied"] == [200, "max-age=31536000; includeSubDomains; preload"]
    assert answers["csrf_cookie_secure"] is True


@pytest.mark.slow
def test_by_default_plain_http_is_served_without_hsts():
    done = manage("shell", "-c", REQUESTS, SECRET_KEY=secrets.token_urlsafe(50))

    assert done.returncode == 0, done.stdout + done.stderr
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers["plain"] == [200, None]
    assert answers["proxied"] == [200, None]
    assert answers["csrf_cookie_secure"] is False


@pytest.mark.slow
def test_a_proxy_ssl_header_without_its_value_refuses_to_start_naming_the_variable():
    done = manage("check", SECRET_KEY=secrets.token_urlsafe(50), SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")

    assert done.returncode != 0
    assert "ImproperlyConfigured: SECURE_PROXY_SSL_HEADER must be a header name and its value" in done.stderr
