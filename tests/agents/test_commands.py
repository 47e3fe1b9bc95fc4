"""The management commands `make up` runs before it starts the processes."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token


def ensure_admin() -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("ensure_admin", stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue()


def test_ensure_admin_creates_a_staff_superuser_with_the_given_password(db, monkeypatch):
    monkeypatch.setenv("ADMIN_PASSWORD", "s3cret-pass")

    token, _ = ensure_admin()

    admin = get_user_model().objects.get(username="admin")
    assert admin.is_staff
    assert admin.is_superuser
    assert admin.check_password("s3cret-pass")
    assert Token.objects.get(user=admin).key == token


def test_ensure_admin_prints_a_generated_password_once(db, monkeypatch):
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)

    first_token, first_notice = ensure_admin()
    second_token, second_notice = ensure_admin()

    password = first_notice.split("with password ")[1].split()[0]
    assert get_user_model().objects.get(username="admin").check_password(password)
    assert second_notice == ""
    assert second_token == first_token
    assert get_user_model().objects.filter(username="admin").count() == 1


def test_check_redis_passes_when_redis_answers(settings):
    call_command("check_redis")


def test_check_redis_fails_in_one_line_when_redis_is_down(settings):
    settings.REDIS_URL = settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"

    with pytest.raises(CommandError) as error:
        call_command("check_redis")

    assert "\n" not in str(error.value)
    assert "redis-server" in str(error.value)
