import uuid

import pytest

from caching.memoize import memoize
from caching.models import MemoizedFunction
from caching.sync import memo_sync_registry

pytestmark = pytest.mark.django_db


def declare(name: str, version: str):
    def square(n: int) -> int:
        return n * n

    return memoize(ttl=60, name=name, version=version)(square)


def test_a_declared_function_gets_a_row():
    name = f"tests.sync_{uuid.uuid4().hex[:8]}"
    declare(name, "1")

    report = memo_sync_registry()

    assert name in report.created
    assert MemoizedFunction.objects.get(name=name).version == "1"


def test_a_new_version_updates_the_row():
    name = f"tests.sync_{uuid.uuid4().hex[:8]}"
    declare(name, "1")
    memo_sync_registry()
    declare(name, "2")

    report = memo_sync_registry()

    assert report.updated == [name]
    assert MemoizedFunction.objects.get(name=name).version == "2"


def test_a_function_the_code_no_longer_declares_is_kept_unregistered():
    MemoizedFunction.objects.create(name="tests.gone", version="1")

    report = memo_sync_registry()

    assert report.unregistered == ["tests.gone"]
    assert MemoizedFunction.objects.get(name="tests.gone").registered is False
