import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentplatform.settings")
django_application = get_asgi_application()

# Imported once Django is set up: the endpoint reads models.
from agents.api.events_endpoint import EventsEndpoint  # noqa: E402

# Server-Sent Events are answered before Django's handler; every other path is Django's.
application = EventsEndpoint(fallback=django_application)
