"""GET /api/v1/events/: run events as Server-Sent Events.

Served by the ASGI `events` process as a plain ASGI endpoint in front of Django: an open stream
is one coroutine waiting on Redis, holding no thread and no database connection. (A Django view
would do too, but Django's sync middleware parks a thread per request for as long as the response
streams.) The WSGI web process answers the same path with a redirect to the events process.
"""

import asyncio
import io
import json
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib import auth
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponseRedirect
from rest_framework.authtoken.models import Token

from agents.errors import RunRejected
from agents.event_stream import EventStream, event_stream_for, event_stream_read, in_db_thread
from agents.models import Run

EVENTS_PATH = "/api/v1/events/"
FILTERS = {"agent", "run"}


class EventsEndpoint:
    """An ASGI app: SSE at EVENTS_PATH, everything else to `fallback` (the Django application)."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != EVENTS_PATH:
            return await self.fallback(scope, receive, send)
        request = ASGIRequest(scope, io.BytesIO())
        if request.method != "GET":
            return await _answer(send, 405, {"detail": f'Method "{request.method}" not allowed.'}, allow="GET")
        user, problem = await _authenticate(request)
        if user is None:
            return await _answer(send, 401, {"detail": problem}, www_authenticate="Token")
        unknown = sorted(set(request.GET) - FILTERS)
        if unknown:
            return await _answer(send, 400, {name: ["Unknown parameter; filter by agent or run."] for name in unknown})
        unstorable = sorted(name for name in FILTERS if "\x00" in request.GET.get(name, ""))
        if unstorable:
            # No agent name or run id holds one, and PostgreSQL cannot even compare a text that does.
            return await _answer(send, 400, {name: ["A NUL character is not allowed."] for name in unstorable})
        try:
            stream = await in_db_thread(
                event_stream_for, user=user, agent=request.GET.get("agent") or None, run=request.GET.get("run") or None
            )
        except RunRejected as exc:
            return await _answer(send, 400, exc.errors)
        except Run.DoesNotExist:
            return await _answer(send, 404, {"detail": "No such run."})
        await _stream(stream, receive, send)


async def _answer(send, status: int, body: dict[str, Any], **headers: str) -> None:
    payload = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    head += [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


async def _authenticate(request: HttpRequest) -> tuple[Any, str]:
    """The user behind an API token or a session cookie, or None and why not (as the REST API words it)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, key = header.partition(" ")
        if scheme != "Token" or not key.strip():
            return None, "Invalid token header."
        token = await in_db_thread(Token.objects.select_related("user").filter(key=key.strip()).first)
        if token is None or not token.user.is_active:
            return None, "Invalid token."
        return token.user, ""
    session_key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
    if session_key:
        request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        user = await in_db_thread(auth.get_user, request)
        if user.is_authenticated:
            return user, ""
    return None, "Authentication credentials were not provided."


async def _stream(stream: EventStream, receive, send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                # Proxies such as nginx would otherwise buffer the stream.
                (b"x-accel-buffering", b"no"),
            ],
        }
    )

    async def forward() -> None:
        subscribed = False
        async for event in event_stream_read(stream, keepalive=settings.EVENTS_KEEPALIVE_SECONDS):
            if event is None:
                # The first comment tells the client that every later event will reach it.
                chunk = ": keepalive\n\n" if subscribed else "retry: 3000\n: subscribed\n\n"
                subscribed = True
            else:
                chunk = f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(forward()), asyncio.ensure_future(disconnected())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()


class _TemporaryRedirect(HttpResponseRedirect):
    status_code = 307


def events_redirect(request: HttpRequest) -> HttpResponseRedirect:
    """The WSGI web process does not serve streams: it sends the client to the events process."""
    return _TemporaryRedirect(settings.EVENTS_URL.rstrip("/") + request.get_full_path())
