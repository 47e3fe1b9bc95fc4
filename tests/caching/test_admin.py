import uuid

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from agentplatform.redis_client import redis_client
from caching.memoize import Memoized, memoize
from caching.models import MemoizedFunction
from caching.sync import memo_sync_registry

CHANGELIST_URL = reverse("admin:caching_memoizedfunction_changelist")


@pytest.fixture
def square(db) -> Memoized:
    """A memoized function with a row, as the registry sync makes it."""

    def square(n: int) -> int:
        return n * n

    memoized = memoize(ttl=60, name=f"tests.admin_{uuid.uuid4().hex[:8]}")(square)
    memo_sync_registry()
    return memoized


def row(memoized: Memoized) -> MemoizedFunction:
    return MemoizedFunction.objects.get(name=memoized.name)


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def test_changelist_shows_each_functions_statistics(staff_client, square):
    square(3)
    square(3)
    square.local_clear()
    square(3)

    response = staff_client.get(CHANGELIST_URL, {"q": square.name})

    assert response.status_code == 200
    (listed,) = response.context["cl"].result_list
    stats = listed.stats
    assert (stats.local_hits, stats.redis_hits, stats.misses, stats.computations) == (1, 1, 1, 1)
    html = response.content.decode()
    assert square.name in html
    assert '<td class="field-hit_rate">66.7</td>' in html


def test_changelist_renders_with_the_registered_filter(staff_client, square):
    response = staff_client.get(CHANGELIST_URL, {"registered__exact": "1"})

    assert response.status_code == 200
    assert square.name in response.content.decode()


def test_clear_action_removes_the_functions_entries(staff_client, square):
    square(1)
    square(2)

    response = staff_client.post(CHANGELIST_URL, {"action": "clear_entries", "_selected_action": [row(square).pk]})

    assert response.status_code == 302
    assert redis_client().exists(square.key(1), square.key(2)) == 0
    assert messages_of(response) == ["Removed 2 memoized entries of 1 function(s)."]
    square(1)
    assert square.stats().computations == 3


def test_add_and_delete_pages_are_forbidden(staff_client, square):
    assert staff_client.get(reverse("admin:caching_memoizedfunction_add")).status_code == 403
    assert staff_client.get(reverse("admin:caching_memoizedfunction_delete", args=[row(square).pk])).status_code == 403


def test_a_functions_page_is_read_only(staff_client, square):
    url = reverse("admin:caching_memoizedfunction_change", args=[row(square).pk])

    page = staff_client.get(url)
    response = staff_client.post(url, {"name": "renamed", "version": "9"})

    assert page.status_code == 200
    assert response.status_code == 403
    assert row(square).version == "1"
