"""Token authentication whose one query also says whether the user may submit to the critical tier,
so that checking the permission costs a submission no query of its own."""

import functools

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
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


class CriticalAwareTokenAuthentication(TokenAuthentication):
    """DRF's TokenAuthentication, with the user's critical-tier permission read in the same query."""

    def authenticate_credentials(self, key: str):
        if "\x00" in key:
            # PostgreSQL cannot even compare a text holding NUL: no such token exists.
            raise exceptions.AuthenticationFailed(_("Invalid token."))
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
        token.user = user
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        # Granted to the user or to one of their groups, as Django's ModelBackend reads it.
        setattr(user, CRITICAL_PERMISSION_ATTRIBUTE, bool(row[-1]))
        return (user, token)
