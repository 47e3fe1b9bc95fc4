"""Run-event fan-out: publish → 100 subscribers, delivery latency p50/p99 (target p99 <= 10 ms).

    .venv/bin/python bench/events.py [--subscribers 100] [--messages 1000] [--rate 200] [--processes 2]

Measures the platform's own bus under a throw-away Redis prefix (no database is needed): the
subscribers SUBSCRIBE with redis-py to the global run-event channel (`all_channel()`, or an agent's
channel with `--channel agent`), and once Redis reports every one of them subscribed (PUBSUB
NUMSUB), this process publishes run events with `agentplatform.events.publish_run_events` at a
steady rate — each a real `run_event()` with the wall-clock send time (`time.time_ns()`, taken just
before the call) added to it. Every subscriber notes the wall-clock time it got each message; the
latency of one delivery is that minus the send time (one machine, one clock, so the figures of
different processes compare). Reported: p50, p95, p99 and max over every delivery (each message
to each subscriber), the same over the first delivery of each event (the bus alone, without the
wait for its turn on a subscriber process), deliveries against subscribers x messages (none lost
is expected), and whether the target is met. A short warm-up precedes the measured messages and
is not counted.

Why subscriber processes of asyncio clients: 100 subscribers are 100 Redis connections, and at 200
messages/s that is 20,000 deliveries/s to read. Threads would contend for one GIL and wake one
another up; one process per subscriber would be 100 interpreters on 2 cores. A few processes
(`--processes`, default the number of CPUs) each run their share of the subscribers as
`redis.asyncio` pub-sub clients on one event loop, each on its own connection as a real
subscriber would be. A subscriber only appends (receive time, raw payload) while measuring — the
JSON is parsed after the last message, and the garbage collector is off until then — so the
bookkeeping costs microseconds per delivery, not the milliseconds being measured.
"""

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import sys
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import configure, delete_prefixed_keys, paced, percentiles

configure()

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STOP = b"bench-stop"
WARM_UP = 20
TARGET_P99_MS = 10.0


# --- subscribers (child processes) ----------------------------------------------------------


async def subscribe_and_record(url: str, channel: str, count: int, pipe: Connection, seconds: float) -> list[list]:
    import redis.asyncio as aioredis

    # No socket timeout: redis-py 8 gives up on a read after 5 s by default, and a subscriber waits
    # as long as the start-up of the other processes takes. No health checks: they would interleave
    # PINGs with the messages being timed.
    client = aioredis.Redis.from_url(url, socket_timeout=None, health_check_interval=0)
    pubsubs = [client.pubsub() for _ in range(count)]
    for pubsub in pubsubs:
        await pubsub.subscribe(channel)
        confirmation = await pubsub.get_message(timeout=10)
        if not confirmation or confirmation["type"] != "subscribe":
            raise RuntimeError(f"no subscription confirmed on {channel}: {confirmation}")
    received: list[list] = [[] for _ in pubsubs]

    async def record(pubsub, into: list) -> None:
        async for message in pubsub.listen():
            now = time.time_ns()
            if message["type"] != "message":
                continue
            if message["data"] == STOP:
                return
            into.append((now, message["data"]))

    gc.disable()
    pipe.send("ready")
    try:
        listeners = [asyncio.create_task(record(pubsub, into)) for pubsub, into in zip(pubsubs, received, strict=True)]
        # A subscriber that missed the stop message still ends, after the whole run could have taken.
        await asyncio.wait(listeners, timeout=seconds)
        for listener in listeners:
            listener.cancel()
    finally:
        gc.enable()
        for pubsub in pubsubs:
            await pubsub.aclose()
        await client.aclose()
    return received


def subscriber_process(url: str, channel: str, count: int, pipe: Connection, seconds: float) -> None:
    received = asyncio.run(subscribe_and_record(url, channel, count, pipe, seconds))
    latencies_us, warm_up, foreign = [], 0, 0
    per_subscriber = []
    for deliveries in received:
        measured = 0
        for at_ns, data in deliveries:
            event = json.loads(data)
            if "bench_sent_ns" not in event:
                foreign += 1
            elif event.get("bench_warm_up"):
                warm_up += 1
            else:
                latencies_us.append((event["bench_sent_ns"], (at_ns - event["bench_sent_ns"]) / 1000))
                measured += 1
        per_subscriber.append(measured)
    pipe.send({"latencies_us": latencies_us, "per_subscriber": per_subscriber, "warm_up": warm_up, "foreign": foreign})
    pipe.close()


# --- the publisher (this process) ----------------------------------------------------------


def publish_one(*, warm_up: bool = False) -> None:
    from agentplatform.events import publish_run_events, run_event

    event = run_event(
        event="succeeded", run_id=uuid.uuid4(), agent="bench.events", tier="standard", status="succeeded", attempt=1
    )
    if warm_up:
        event["bench_warm_up"] = True
    event["bench_sent_ns"] = time.time_ns()
    publish_run_events([event])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100, help="subscribers, each on its own connection")
    parser.add_argument("--messages", type=int, default=1000, help="events published (after a warm-up)")
    parser.add_argument("--rate", type=float, default=200, help="events published per second")
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 2, help="subscriber processes sharing the subscribers"
    )
    parser.add_argument("--channel", choices=["all", "agent"], default="all", help="the global or an agent's channel")
    args = parser.parse_args()
    processes = max(1, min(args.processes, args.subscribers))

    import django

    django.setup()
    import redis

    from agentplatform.events import agent_channel, all_channel

    channel = all_channel() if args.channel == "all" else agent_channel("bench.events")
    shares = [args.subscribers // processes + (i < args.subscribers % processes) for i in range(processes)]
    seconds = (WARM_UP + args.messages) / args.rate + 60
    # Fork before this process opens any Redis connection; the children use their own clients.
    context = multiprocessing.get_context("fork")
    children, pipes = [], []
    try:
        for share in shares:
            ours, theirs = context.Pipe()
            child = context.Process(target=subscriber_process, args=(REDIS_URL, channel, share, theirs, seconds))
            child.start()
            theirs.close()
            children.append(child)
            pipes.append(ours)
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("a subscriber process did not get ready")
        client = redis.Redis.from_url(REDIS_URL)
        subscribed = dict(client.pubsub_numsub(channel))[channel.encode()]
        if subscribed != args.subscribers:
            raise RuntimeError(f"Redis reports {subscribed} subscribers on {channel}, expected {args.subscribers}")

        paced(args.rate, WARM_UP, lambda: publish_one(warm_up=True))
        started = time.monotonic()
        paced(args.rate, args.messages, publish_one)
        publishing_s = time.monotonic() - started
        time.sleep(1)  # let the last deliveries arrive before the stop message follows them
        client.publish(channel, STOP)

        latencies_us: list[tuple[int, float]] = []
        per_subscriber: list[int] = []
        foreign = 0
        for pipe in pipes:
            if not pipe.poll(seconds + 30):
                raise RuntimeError("a subscriber process did not report")
            report = pipe.recv()
            latencies_us += report["latencies_us"]
            per_subscriber += report["per_subscriber"]
            foreign += report["foreign"]
        for child in children:
            child.join(timeout=30)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join()
        delete_prefixed_keys()

    expected = args.subscribers * args.messages
    if len(latencies_us) < 2:
        print("no deliveries measured")
        sys.exit(1)
    figures = percentiles([us / 1000 for _, us in latencies_us])
    first: dict[int, float] = {}
    for sent_ns, us in latencies_us:
        first[sent_ns] = min(us, first.get(sent_ns, us))
    first_figures = percentiles([us / 1000 for us in first.values()]) if len(first) > 1 else figures
    print(
        f"\nrun-event fan-out on {channel}: {args.subscribers} subscribers in {processes} processes, "
        f"{args.messages} events at {args.rate:g}/s (published in {publishing_s:.2f} s)"
    )
    print(f"  {'deliveries':<28} {len(latencies_us):>9,} of {expected:,} expected")
    print(f"  {'lost':<28} {expected - len(latencies_us):>9,}")
    print(f"  {'fewest / most per subscriber':<28} {min(per_subscriber):>9,} / {max(per_subscriber):,}")
    if foreign:
        print(f"  {'other messages on channel':<28} {foreign:>9,}")
    print(f"\npublish -> subscriber latency, ms {'every delivery':>16} {'first per event':>16}")
    for name in ("p50", "p95", "p99", "max"):
        print(f"  {name:<32} {figures[name]:16.2f} {first_figures[name]:16.2f}")
    print(f"  {'n':<32} {figures['n']:16,} {first_figures['n']:16,}")
    met = figures["p99"] <= TARGET_P99_MS and len(latencies_us) == expected
    print(f"\n  target p99 <= {TARGET_P99_MS:g} ms, none lost: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
