"""Per-agent concurrency limits across all workers, as leases in Redis.

A slot is a member of a sorted set scored by its lease expiry, so a slot held by a killed
worker frees itself when the lease runs out instead of leaking like a counter would. Runs that
find no free slot wait in a second sorted set (oldest first) and are woken when a slot frees.
"""

import time

from agentplatform.redis_client import redis_client, redis_key

# KEYS[1] slots; ARGV: now, lease expiry, limit, run id. Returns 1 if the run holds a slot.
ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
    return 1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
    return 1
end
return 0
"""

# KEYS[1] slots, KEYS[2] waiters; ARGV: now, limit, how many at most. Pops waiters for free slots.
WAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
local n = math.min(free, tonumber(ARGV[3]))
if n <= 0 then return {} end
local popped = redis.call('ZPOPMIN', KEYS[2], n)
local ids = {}
for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
return ids
"""


def slots_key(agent: str) -> str:
    return redis_key("concurrency", agent)


def waiters_key(agent: str) -> str:
    return redis_key("concurrency", agent, "waiting")


def slot_acquire(*, agent: str, run_id: str, limit: int, lease_seconds: float) -> bool:
    """Take one of the agent's `limit` slots for `run_id` for `lease_seconds`; False when all are held."""
    now = time.time()
    client = redis_client()
    acquired = client.eval(ACQUIRE, 1, slots_key(agent), now, now + lease_seconds, limit, run_id)
    if acquired:
        client.zrem(waiters_key(agent), run_id)
    return bool(acquired)


def slot_wait(*, agent: str, run_id: str) -> None:
    """Queue `run_id` to be woken when a slot of the agent frees (first come, first woken)."""
    redis_client().zadd(waiters_key(agent), {run_id: time.time()}, nx=True)


def slot_release(*, agent: str, run_id: str, limit: int) -> list[str]:
    """Give back the run's slot; returns the waiting run ids to wake for the slots now free."""
    client = redis_client()
    client.zrem(slots_key(agent), run_id)
    return slots_wake(agent=agent, limit=limit)


def slots_wake(*, agent: str, limit: int, most: int = 100) -> list[str]:
    """Pop waiting run ids for the agent's free slots (also frees slots whose lease expired)."""
    ids = redis_client().eval(WAKE, 2, slots_key(agent), waiters_key(agent), time.time(), limit, most)
    return [run_id.decode() for run_id in ids]


def slots_held(agent: str) -> int:
    client = redis_client()
    client.zremrangebyscore(slots_key(agent), "-inf", time.time())
    return client.zcard(slots_key(agent))
