"""The shared result cache: the same input to the same agent version is computed once.

Entries live under `<prefix>result:<agent>:<version>:<sha256 of canonical JSON input>`, hold the
result inside a wrapper (so that a cached null differs from a miss) and expire with the agent's
cache TTL. A new agent version makes the old entries unreachable; they expire on their own.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from agentplatform.metrics import cache_lookups_record
from agentplatform.redis_client import redis_client, redis_delete_matching, redis_key
from scheduling.rate import RateCharge

logger = logging.getLogger(__name__)


def input_hash(input: Any) -> str:
    """sha256 of the input's canonical JSON: key order and whitespace do not matter."""
    canonical = json.dumps(input, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def result_key(agent: str, version: str, digest: str) -> str:
    return redis_key("result", agent, version, digest)


@dataclass(frozen=True)
class CachedResult:
    result: Any


def result_cache_get_many(
    entries: list[tuple[str, str, Any]], *, charge: RateCharge | None = None
) -> list[CachedResult | None]:
    """Look up (agent, version, input) entries in one round trip; None for a miss. A rate `charge` not yet
    settled rides on the round trip and is settled with it (RateExceeded)."""
    if not entries:
        return []
    keys = [result_key(agent, version, input_hash(input)) for agent, version, input in entries]
    riding = charge is not None and not charge.settled
    pipe = redis_client().pipeline(transaction=False)
    if riding:
        charge.queue(pipe)
    pipe.mget(keys)
    try:
        *rate_replies, stored = pipe.execute()
    except redis.RedisError:
        # The cache is an optimisation: without it the runs simply execute.
        logger.exception("result cache lookup failed")
        if riding:
            charge.settle(None)
        return [None] * len(entries)
    if riding:
        charge.settle(rate_replies)
    cache_lookups_record([agent for agent, _, _ in entries], stored)
    return [CachedResult(json.loads(value)["result"]) if value is not None else None for value in stored]


def result_cache_put(*, agent: str, version: str, input: Any, result: Any, ttl: int) -> None:
    """Store a result for `ttl` seconds (best effort)."""
    pipe = redis_client().pipeline(transaction=False)
    result_cache_store(pipe, agent=agent, version=version, input=input, result=result, ttl=ttl)
    try:
        pipe.execute()
    except redis.RedisError:
        logger.exception("could not cache the result of %s", agent)


def result_cache_store(
    pipe: redis.client.Pipeline, *, agent: str, version: str, input: Any, result: Any, ttl: int
) -> None:
    """Queue on `pipe` the command that stores a result for `ttl` seconds (sent with the caller's other commands)."""
    pipe.set(result_key(agent, version, input_hash(input)), json.dumps({"result": result}), ex=ttl)


def result_cache_clear(agent: str) -> int:
    """Remove every cached result of the agent, all versions; returns how many entries went."""
    return redis_delete_matching(redis_key("result", agent, "*"))
