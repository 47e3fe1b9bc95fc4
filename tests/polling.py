"""Waiting in tests for something that other processes (workers, servers) make true."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(find: Callable[[], T], *, seconds: float = 10, what: str = "the condition", every: float = 0.05) -> T:
    """Call `find` until it returns something truthy, and return that; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        if found := find():
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g}s")
        time.sleep(every)
