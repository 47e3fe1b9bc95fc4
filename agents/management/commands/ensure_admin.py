"""Create the staff superuser once and print its API token.

The token goes to stdout alone, so that a script can capture it; the one-time password
notice goes to stderr. Like Django's createsuperuser (DJANGO_SUPERUSER_PASSWORD), the
password is read from the environment here: it is a start-up input, not a setting.
"""

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from rest_framework.authtoken.models import Token

PASSWORD_ENV = "ADMIN_PASSWORD"


class Command(BaseCommand):
    help = (
        f"Create the staff superuser if it does not exist (password from {PASSWORD_ENV}, or generated and "
        "shown once), then print its API token."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default="admin")

    @transaction.atomic
    def handle(self, *args, username: str, **options) -> None:
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            chosen = os.environ.get(PASSWORD_ENV)
            password = chosen or secrets.token_urlsafe(12)
            user = User.objects.create_superuser(username=username, email="", password=password)
            if chosen:
                notice = f"Created staff superuser {username!r} with the password from {PASSWORD_ENV}."
            else:
                notice = (
                    f"Created staff superuser {username!r} with password {password} "
                    f"(shown only now; set {PASSWORD_ENV} to choose it)."
                )
            self.stderr.write(notice, style_func=self.style.WARNING)
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(token.key)
