import time
import uuid

from caching.results import input_hash, result_cache_clear, result_cache_get_many, result_cache_put


def agent_name() -> str:
    return f"agent-{uuid.uuid4().hex[:8]}"


def test_the_input_hash_ignores_key_order_and_whitespace():
    assert input_hash({"a": 1, "b": [1, 2]}) == input_hash({"b": [1, 2], "a": 1})


def test_a_stored_result_is_found_for_the_same_agent_version_and_input():
    name = agent_name()
    result_cache_put(agent=name, version="1", input={"x": 1}, result={"y": 2}, ttl=60)

    (hit,) = result_cache_get_many([(name, "1", {"x": 1})])

    assert hit.result == {"y": 2}


def test_a_cached_null_is_a_hit_not_a_miss():
    name = agent_name()
    result_cache_put(agent=name, version="1", input={}, result=None, ttl=60)

    (hit,) = result_cache_get_many([(name, "1", {})])

    assert hit is not None
    assert hit.result is None


def test_another_version_or_input_misses():
    name = agent_name()
    result_cache_put(agent=name, version="1", input={"x": 1}, result=1, ttl=60)

    assert result_cache_get_many([(name, "2", {"x": 1}), (name, "1", {"x": 2})]) == [None, None]


def test_entries_expire_with_the_ttl():
    name = agent_name()
    result_cache_put(agent=name, version="1", input={}, result=1, ttl=1)

    time.sleep(1.2)

    assert result_cache_get_many([(name, "1", {})]) == [None]


def test_clearing_an_agent_removes_its_entries_only():
    name, other = agent_name(), agent_name()
    for version in ("1", "2"):
        result_cache_put(agent=name, version=version, input={}, result=1, ttl=60)
    result_cache_put(agent=other, version="1", input={}, result=1, ttl=60)

    removed = result_cache_clear(name)

    assert removed == 2
    assert result_cache_get_many([(name, "1", {}), (other, "1", {})])[1] is not None
