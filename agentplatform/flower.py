"""Flower behind HTTP basic auth on every route: `python -m agentplatform.flower [Flower's options]`.

The credentials come from Flower's own `FLOWER_BASIC_AUTH` (`user:password`, several separated by
commas; `--basic_auth` works too). Flower 2 checks them in its pages and API only: `/metrics`,
`/healthcheck`, `/static/`, `/login` and its 404 page answer anyone, and with no credentials set
every page does. Here each request is checked before it is routed, whatever its path and method,
and Flower refuses to start without credentials. It listens on 127.0.0.1 unless `--address` says
otherwise. What the pages show is censored at its source, the workers (agentplatform/worker_inspect.py).
"""

import hmac
import sys
from base64 import b64decode
from collections.abc import Sequence
from typing import Any

import flower.command
import tornado.httputil
import tornado.web
from celery.bin.celery import main as celery_main
from flower.app import Flower

CREDENTIALS_ENV = "FLOWER_BASIC_AUTH"
DEFAULT_ADDRESS = "127.0.0.1"
REALM = "flower"


def credentials_problem(entries: Sequence[str] | None) -> str | None:
    """Why Flower must not start with these credentials, or None when each is a `user:password`."""
    if not entries:
        return f"{CREDENTIALS_ENV} is not set: Flower needs credentials, e.g. {CREDENTIALS_ENV}=admin:<password>"
    for entry in entries:
        user, _, password = entry.partition(":")
        if not user or not password:
            # The entry itself may hold a password: say where it is, not what it is.
            return f"{CREDENTIALS_ENV} must be user:password (several separated by commas), each with both parts"
    return None


def credentials_match(authorization: str, entries: Sequence[str]) -> bool:
    """Whether an `Authorization: Basic …` header carries one of the `user:password` entries."""
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = b64decode(encoded.strip(), validate=True)
    except ValueError:
        return False
    matched = False
    for entry in entries:
        # Every entry is compared, in constant time, so that timing tells nothing of which came close.
        matched |= hmac.compare_digest(entry.encode(), given)
    return matched


class CredentialsRequired(tornado.web.RequestHandler):
    """Answers any request 401 and asks for the credentials."""

    def check_xsrf_cookie(self) -> None:
        # Tornado checks a POST's XSRF token before prepare(); a request without credentials is
        # refused for that, not for its token.
        return

    def prepare(self) -> None:
        self.set_status(401)
        self.set_header("WWW-Authenticate", f'Basic realm="{REALM}"')
        self.finish("Credentials required\n")


class GuardedFlower(Flower):
    """Flower that refuses to start without credentials and checks them before routing any request."""

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        problem = credentials_problem(options.basic_auth if options is not None else None)
        if problem:
            raise SystemExit(problem)
        if not options.address and not options.unix_socket:
            # Flower's own default, an empty address, listens on every interface.
            options.address = DEFAULT_ADDRESS
        super().__init__(options=options, **kwargs)

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        if credentials_match(request.headers.get("Authorization", ""), self.options.basic_auth):
            return super().find_handler(request, **kwargs)
        return self.get_handler_delegate(request, CredentialsRequired)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `celery --app agentplatform flower` with GuardedFlower in place of Flower."""
    # Flower's command builds its application from this name when it runs.
    flower.command.Flower = GuardedFlower
    sys.argv = ["celery", "--app", "agentplatform", "flower", *(sys.argv[1:] if argv is None else argv)]
    return celery_main()


if __name__ == "__main__":
    sys.exit(main())
