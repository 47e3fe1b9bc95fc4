"""Token authentication whose one query also says whether the user may submit to the critical tier,
so that checking the permission costs a submission no query of its own."""

from django.contrib.auth.models import Permission
from django.db.models import Exists, OuterRef
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication

from agents.runs.submit import CRITICAL_PERMISSION, CRITICAL_PERMISSION_ATTRIBUTE


def _granted(permission: str, **user) -> Exists:
    app_label, codename = permission.split(".", 1)
    return Exists(Permission.objects.filter(content_type__app_label=app_label, codename=codename, **user))


class CriticalAwareTokenAuthentication(TokenAuthentication):
    """DRF's TokenAuthentication, with the user's critical-tier permission read in the same query."""

    def authenticate_credentials(self, key: str):
        if "\x00" in key:
            # PostgreSQL cannot even compare a text holding NUL: no such token exists.
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        # Granted to the user or to one of their groups, as Django's ModelBackend reads it.
        token = (
            self.get_model()
            .objects.select_related("user")
            .annotate(
                may_submit_critical=_granted(CRITICAL_PERMISSION, user=OuterRef("user_id"))
                | _granted(CRITICAL_PERMISSION, group__user=OuterRef("user_id"))
            )
            .filter(key=key)
            .first()
        )
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        setattr(token.user, CRITICAL_PERMISSION_ATTRIBUTE, token.may_submit_critical)
        return (token.user, token)
