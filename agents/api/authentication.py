"""Token authentication whose one query also says whether the user may submit to the critical tier,
so that checking the permission costs a submission no query of its own, and which keeps what it read
for a moment, so that a client sending request after request costs no query at all."""

import copy
import functools
import threading
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token

from agents.runs.submit import CRITICAL_PERMISSION, CRITICAL_PERMISSION_ATTRIBUTE


@functools.cache
def _token_sql() -> str:
    """The token, its user's columns and the permission, in one statement written once per process.

    Plain SQL: building and compiling the equivalent ORM query (a join and two EXISTS) cost each
    request more than running it.
    """
    quote = connection.ops.quote_name
    user = get_user_model()
    user_columns = ", ".join(f"u.{quote(field.column)}" for field in user._meta.concrete_fields)
    tables = {
        "token": quote(Token._meta.db_table),
        "user": quote(user._meta.db_table),
        "user_perms": quote(user._meta.get_field("user_permissions").remote_field.through._meta.db_table),
        "user_groups": quote(user._meta.get_field("groups").remote_field.through._meta.db_table),
        "group_perms": quote(Group._meta.get_field("permissions").remote_field.through._meta.db_table),
        "perm": quote(Permission._meta.db_table),
        "ct": quote(ContentType._meta.db_table),
    }
    granted = (
        "SELECT 1 FROM {perm} p JOIN {ct} ct ON ct.id = p.content_type_id "
        "WHERE p.codename = %s AND ct.app_label = %s AND p.id IN ({holders})"
    )
    by_user = granted.format(
        **tables, holders=f"SELECT up.permission_id FROM {tables['user_perms']} up WHERE up.user_id = u.id"
    )
    by_group = granted.format(
        **tables,
        holders=(
            f"SELECT gp.permission_id FROM {tables['group_perms']} gp JOIN {tables['user_groups']} ug "
            "ON ug.group_id = gp.group_id WHERE ug.user_id = u.id"
        ),
    )
    return (
        f"SELECT t.{quote('key')}, t.{quote('created')}, {user_columns}, "
        f"(EXISTS ({by_user}) OR EXISTS ({by_group})) "
        f"FROM {tables['token']} t JOIN {tables['user']} u ON u.id = t.user_id WHERE t.{quote('key')} = %s"
    )


# token key -> (user, token, may submit critical, when it was read, monotonic seconds)
_known: dict[str, tuple[object, Token, bool, float]] = {}
_known_lock = threading.Lock()
KNOWN_TOKENS_MAX = 10_000


def known_tokens_forget(**kwargs) -> None:
    """Forget the tokens this process has read: a change to a token, a user or a permission applies at once."""
    with _known_lock:
        _known.clear()


post_save.connect(known_tokens_forget, sender=Token, dispatch_uid="known_tokens_forget_token_saved")
post_delete.connect(known_tokens_forget, sender=Token, dispatch_uid="known_tokens_forget_token_deleted")
post_save.connect(known_tokens_forget, sender=settings.AUTH_USER_MODEL, dispatch_uid="known_tokens_forget_user_saved")
post_delete.connect(
    known_tokens_forget, sender=settings.AUTH_USER_MODEL, dispatch_uid="known_tokens_forget_user_deleted"
)
# Permissions granted or taken, to users or to their groups, and group membership.
m2m_changed.connect(known_tokens_forget, dispatch_uid="known_tokens_forget_m2m")


class CriticalAwareTokenAuthentication(TokenAuthentication):
    """DRF's TokenAuthentication, with the user's critical-tier permission read in the same query, and
    what it read kept for API_TOKEN_CACHE_SECONDS: a change made in this process (admin, shell) applies
    at once, one made elsewhere within that time."""

    def authenticate_credentials(self, key: str):
        if "\x00" in key:
            # PostgreSQL cannot even compare a text holding NUL: no such token exists.
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        ttl = settings.API_TOKEN_CACHE_SECONDS
        known = _known.get(key)
        if known is not None and time.monotonic() - known[3] < ttl:
            user, token, may_submit_critical, _read_at = known
            # Each request gets its own instances: views and DRF set attributes on them.
            return self._authenticated(copy.copy(user), copy.copy(token), may_submit_critical)
        user, token, may_submit_critical = self._read(key)
        if ttl > 0:
            with _known_lock:
                if len(_known) >= KNOWN_TOKENS_MAX:
                    _known.clear()
                _known[key] = (user, token, may_submit_critical, time.monotonic())
            user, token = copy.copy(user), copy.copy(token)
        return self._authenticated(user, token, may_submit_critical)

    @staticmethod
    def _authenticated(user, token: Token, may_submit_critical: bool):
        token.user = user
        # Granted to the user or to one of their groups, as Django's ModelBackend reads it.
        setattr(user, CRITICAL_PERMISSION_ATTRIBUTE, may_submit_critical)
        return (user, token)

    @staticmethod
    def _read(key: str) -> tuple[object, Token, bool]:
        app_label, codename = CRITICAL_PERMISSION.split(".", 1)
        with connection.cursor() as cursor:
            cursor.execute(_token_sql(), [codename, app_label, codename, app_label, key])
            row = cursor.fetchone()
        if row is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        user_model = get_user_model()
        fields = [field.attname for field in user_model._meta.concrete_fields]
        user = user_model.from_db(connection.alias, fields, row[2 : 2 + len(fields)])
        token = Token.from_db(connection.alias, ["key", "user_id", "created"], [row[0], user.pk, row[1]])
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return user, token, bool(row[-1])
