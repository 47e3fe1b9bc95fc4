"""Submitting runs: validation, the result cache, coalescing, admission, one insert and one dispatch."""

import contextlib
import functools
import json
import logging
import math
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import QuerySet
from django.db.models.base import ModelState
from django.utils import timezone
from pydantic import ValidationError

from agentplatform import events
from agentplatform.metrics import runs_refused_record, runs_submitted_record
from agentplatform.redis_client import redis_client
from agents.errors import IdempotencyConflict, PayloadTooLarge, RunRejected, TierNotPermitted
from agents.models import Agent, Run, RunStatus
from agents.registry import registry
from agents.runs.coalescing import followed_settle, runs_follow_inflight, runs_lead
from agents.runs.dispatch import MessageAhead, broker_is_platform_redis, run_dispatch
from agents.runs.finish import runs_answer_from_cache
from agents.stats import admission_refusals_record
from agents.tuning import agents_named
from scheduling.admission import HIGHER_TIERS, AdmissionRefused, Backlog, admission_check, share_check, share_limit
from scheduling.backlog import agent_field, backlog_fields, backlog_release, backlog_reserve, tier_field, user_field
from scheduling.rate import RateCharge
from scheduling.sla import escalation_due, run_deadline
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

# Longest `expires_in` a caller may give: beyond it, ask for no expiry.
MAX_EXPIRES_IN_SECONDS = 30 * 86400
# Submitting to the critical tier is a permission (granted in the admin, to users or groups); staff have it.
CRITICAL_PERMISSION = "agents.submit_critical"
# Where the API's authentication leaves the answer, so that a submission need not ask the database.
CRITICAL_PERMISSION_ATTRIBUTE = "may_submit_critical"

# What PostgreSQL's jsonb (NUL) and every UTF-8 encoder (half of a surrogate pair) refuse to store.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# How NUL and surrogates look once JSON-encoded (ASCII only): what makes a full look at the input worthwhile.
SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
MAX_PROBLEMS = 10
# New runs inserted with a plain INSERT of a row each; more go as one JSON document of rows.
PLAIN_INSERT_ROWS_MAX = 10


@dataclass(frozen=True)
class RunRequest:
    """What a caller asks for: one run of an agent on an input."""

    agent: str
    input: Any
    tier: str | None = None
    idempotency_key: str | None = None
    deadline: datetime | None = None
    expires_in: float | None = None
    expires_at: datetime | None = None
    # "use": answer from the result cache when it holds this input; "bypass": always run.
    cache: str = "use"
    # The id the new run takes, for code that listens for the run before it exists; a new one if not given.
    run_id: uuid.UUID | None = None


def input_errors(exc: ValidationError) -> dict[str, list[str]]:
    """Pydantic errors as field paths (`a.b.0`) to messages; `non_field_errors` for the input as a whole."""
    errors: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"]) or "non_field_errors"
        errors.setdefault(path, []).append(error["msg"])
    return errors


def user_may_submit_critical(user) -> bool:
    """Staff, and active users granted agents.submit_critical (themselves or through a group)."""
    if user is None or not user.is_active:
        return False
    if user.is_staff or user.is_superuser:
        return True
    known = getattr(user, CRITICAL_PERMISSION_ATTRIBUTE, None)
    if known is not None:
        return bool(known)
    return user.has_perm(CRITICAL_PERMISSION)


def json_problems(
    value: Any, *, max_depth: int | None = None, surrogates_only: bool = False
) -> list[tuple[tuple[str | int, ...], str]]:
    """What a JSON value holds that cannot be stored or sent back, each with its path (at most MAX_PROBLEMS):
    NUL characters and lone surrogates in strings and keys, numbers that are not finite, and nesting
    deeper than `max_depth` (the value itself is level 1). `surrogates_only` looks for lone surrogates alone.
    """
    problems: list[tuple[tuple[str | int, ...], str]] = []
    # Iterative, so that a deep value cannot exhaust the stack that looks at it.
    stack: list[tuple[tuple[str | int, ...], Any, int]] = [((), value, 1)]
    while stack and len(problems) < MAX_PROBLEMS:
        path, item, depth = stack.pop()
        if isinstance(item, dict | list):
            if max_depth is not None and depth > max_depth:
                problems.append((path, f"Nested more than {max_depth} levels deep."))
                continue
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and (problem := _text_problem(key, surrogates_only=surrogates_only)):
                    problems.append(((*path, key), f"The key {problem}."))
                stack.append(((*path, key), child, depth + 1))
        elif isinstance(item, str):
            if problem := _text_problem(item, surrogates_only=surrogates_only):
                problems.append((path, f"The text {problem}."))
        elif isinstance(item, float) and not surrogates_only and not math.isfinite(item):
            problems.append((path, f"{item} is not a number JSON can hold."))
    return sorted(problems, key=lambda problem: [str(part) for part in problem[0]])


def _text_problem(text: str, *, surrogates_only: bool) -> str | None:
    for match in UNSTORABLE.finditer(text):
        character = match[0]
        if character == "\x00":
            if not surrogates_only:
                return "holds a NUL character (\\u0000), which cannot be stored"
        else:
            return f"holds a lone surrogate (\\u{ord(character):04x}), which is not Unicode text"
    return None


def path_label(path: Sequence[str | int]) -> str:
    """`a.b.0`, as input_errors names a place in the input; unstorable characters written as escapes."""
    return ".".join(
        part.encode("unicode_escape").decode("ascii")
        if isinstance(part, str) and UNSTORABLE.search(part)
        else str(part)
        for part in path
    )


def _input_checked(data: Any) -> None:
    """RunRejected (or PayloadTooLarge) for an input that is not an object, too large, or not storable."""
    if not isinstance(data, dict):
        raise RunRejected({"input": ["Expected a JSON object."]})
    limit = settings.RUN_INPUT_MAX_DEPTH
    try:
        text = json.dumps(data, separators=(",", ":"))
    except (RecursionError, ValueError, TypeError) as exc:
        # Only code submits what JSON cannot encode at all (the API parses JSON); say what is wrong.
        problems = json_problems(data, max_depth=limit) or [((), f"Not storable as JSON: {exc}.")]
    else:
        size = len(text.encode())
        if size > settings.RUN_MAX_INPUT_BYTES:
            raise PayloadTooLarge({"input": [f"Input is {size} bytes; the limit is {settings.RUN_MAX_INPUT_BYTES}."]})
        # The encoded text shows, in scans made in C, whether the input can hold anything to refuse.
        suspect = (SUSPECT_ESCAPE.search(text) or "Infinity" in text or "NaN" in text) or text.count("[") + text.count(
            "{"
        ) > limit
        problems = json_problems(data, max_depth=limit) if suspect else []
    if problems:
        errors: dict[str, list[str]] = {}
        for path, message in problems:
            errors.setdefault(path_label(path) or "non_field_errors", []).append(message)
        raise RunRejected({"input": errors})


def _tier(request: RunRequest, agent: Agent, *, critical_allowed: Callable[[], bool]) -> Tier:
    if request.tier is not None:
        if request.tier not in Tier.values:
            raise RunRejected({"tier": [f"{request.tier!r} is not a tier; choose one of {', '.join(Tier.values)}."]})
        tier = Tier(request.tier)
        if tier == Tier.CRITICAL and not critical_allowed():
            raise TierNotPermitted(
                {"tier": [f"Submitting to the critical tier needs the permission {CRITICAL_PERMISSION}."]}
            )
        return tier
    tier = Tier(agent.tier)
    if tier == Tier.CRITICAL and not critical_allowed():
        # The agent's tier is the operators' choice, not the caller's: a caller who did not ask for
        # critical gets the most urgent tier they may use rather than a refusal.
        return Tier.STANDARD
    return tier


def _build_run(
    request: RunRequest,
    *,
    user,
    agents: dict[str, Agent],
    parent: Run | None,
    critical_allowed: Callable[[], bool],
    as_caller: bool,
    inherits: bool = True,
) -> Run:
    """An unsaved Run for a request, or RunRejected with field-level messages."""
    agent = agents.get(request.agent)
    spec = registry.get(request.agent)
    if agent is None or spec is None or not agent.registered:
        raise RunRejected({"agent": [f"Unknown agent {request.agent!r}."]})
    if not agent.enabled:
        raise RunRejected({"agent": [f"Agent {request.agent!r} is disabled."]})
    if parent is not None and inherits and request.tier is None:
        # A child works on its parent's behalf, at its parent's urgency unless it asks for another.
        tier = Tier(parent.tier)
    else:
        tier = _tier(request, agent, critical_allowed=critical_allowed)
    _input_checked(request.input)
    try:
        # A caller is told about a field the agent does not declare; code (a topic's message shared
        # by agents that each read part of it) passes only what the agent takes.
        parsed = spec.parse_input(request.input, lenient=not as_caller)
    except ValidationError as exc:
        raise RunRejected({"input": input_errors(exc)}) from exc
    now = timezone.now()
    if request.deadline is not None and request.deadline <= now:
        raise RunRejected({"deadline": ["The deadline has already passed."]})
    if request.expires_in is not None and request.expires_at is not None:
        raise RunRejected({"expires_at": ["Give expires_in or expires_at, not both."]})
    expires_at = request.expires_at
    if request.expires_in is not None:
        if not 0 < request.expires_in <= MAX_EXPIRES_IN_SECONDS:
            raise RunRejected({"expires_in": [f"Give more than 0 and at most {MAX_EXPIRES_IN_SECONDS} seconds."]})
        expires_at = now + timedelta(seconds=request.expires_in)
    if expires_at is not None and expires_at <= now:
        raise RunRejected({"expires_at": ["The expiry has already passed."]})
    deadline = run_deadline(submitted_at=now, sla_seconds=agent.sla_seconds, requested=request.deadline)
    root = None
    if parent is not None:
        root = parent.root or parent.pk
    if parent is not None and inherits:
        # A tree keeps its top's promises: no child is due later, or may start later, than its parent.
        deadline = min(deadline, parent.deadline)
        if parent.expires_at is not None:
            expires_at = min(expires_at or parent.expires_at, parent.expires_at)
    return _new_run(
        agent=agent,
        submitted_by=user,
        parent=parent,
        **({"id": request.run_id} if request.run_id is not None else {}),
        agent_version=spec.version,
        tier=tier,
        # Computed fields are output: stored, they would be undeclared fields when the input is read back.
        input=parsed.model_dump(mode="json", exclude_computed_fields=True),
        root=root,
        idempotency_key=request.idempotency_key,
        sla_seconds=agent.sla_seconds,
        soft_time_limit=agent.soft_time_limit,
        time_limit=agent.time_limit,
        max_retries=agent.max_retries,
        submitted_at=now,
        deadline=deadline,
        expires_at=expires_at,
        escalate_at=escalation_due(
            submitted_at=now, sla_seconds=agent.sla_seconds, fraction=settings.ESCALATION_SLA_FRACTION
        )
        if tier == Tier.STANDARD
        else None,
    )


def _new_run(*, agent: Agent, submitted_by, parent: Run | None, **values: Any) -> Run:
    """A new Run, with its fields' values set directly and its relations already in hand.

    Django's keyword constructor looks up every field not given and sets each relation through its
    descriptor, and even its positional one sets each field in turn: building a thousand runs cost
    more than inserting them. Runs have no pre_init or post_init receivers, which this skips.
    """
    values.update(
        agent_id=agent.pk,
        submitted_by_id=submitted_by.pk if submitted_by is not None else None,
        parent_id=parent.pk if parent is not None else None,
    )
    if unknown := set(values) - _RUN_ATTNAMES:
        raise TypeError(f"Run has no fields {sorted(unknown)}")
    run = Run.__new__(Run)
    run._state = ModelState()
    run.__dict__.update(_RUN_CONSTANT_DEFAULTS)
    for attname, default in _RUN_CALLED_DEFAULTS:
        if attname not in values:
            run.__dict__[attname] = default()
    run.__dict__.update(values)
    for field, related in zip(_RUN_RELATIONS, (agent, submitted_by, parent), strict=True):
        if related is not None:
            field.set_cached_value(run, related)
    return run


_RUN_FIELDS = Run._meta.concrete_fields
_RUN_ATTNAMES = frozenset(field.attname for field in _RUN_FIELDS)
# The relations a new run is given in hand, in _new_run's order, looked up once rather than per run.
_RUN_RELATIONS = tuple(Run._meta.get_field(name) for name in ("agent", "submitted_by", "parent"))
# What a field holds when not given: a constant, or what its default makes anew for each run (ids, lists).
_RUN_CALLED_DEFAULTS = [(field.attname, field.get_default) for field in _RUN_FIELDS if callable(field.default)]
_RUN_CONSTANT_DEFAULTS = {field.attname: field.get_default() for field in _RUN_FIELDS if not callable(field.default)}


def run_submit(
    *,
    user,
    request: RunRequest,
    parent: Run | None = None,
    as_caller: bool = False,
    inherits: bool = True,
    charge: RateCharge | None = None,
) -> tuple[Run, bool]:
    """Create and dispatch one run; returns (run, created). A repeated idempotency key returns the first run."""
    ((run, created),) = run_submit_many(
        user=user, requests=[request], parent=parent, as_caller=as_caller, inherits=inherits, charge=charge
    )
    return run, created


def run_submit_many(
    *,
    user,
    requests: Sequence[RunRequest],
    parent: Run | None = None,
    as_caller: bool = False,
    parent_round: int | None = None,
    inherits: bool = True,
    charge: RateCharge | None = None,
) -> list[tuple[Run, bool]]:
    """Create runs for all requests in one transaction and dispatch them together, or reject them all.

    `as_caller`: `user` asked for these runs (through the API) and is held to their permissions and
    to the agent's input contract: the critical tier needs agents.submit_critical (TierNotPermitted
    otherwise), an agent whose tier is critical runs on standard for them, and an input field the
    agent does not declare is refused. Without it, the code that submits chose the tier (an agent's
    child run, a schedule an operator set up, a topic's reaction) and undeclared fields are dropped.

    A child of `parent` works on its behalf: on its tier unless it names one, due and expiring no later
    than it; without `inherits` (a run reacting to a message `parent` published) it keeps its own.
    With `parent_round`, the runs are children that `parent` gathers in that round, in this order: they
    are part of work already admitted, so they count in the backlog but are never refused.

    A RunRejected for a batch names the failing item by its index: {"runs": {"3": {"input": [...]}}}.
    An idempotency key already used for another agent, input or tier raises IdempotencyConflict.
    A rate `charge` is settled (RateExceeded) once the runs are found valid and before any is stored,
    in the first round trip the submission makes to Redis.
    """
    agents = agents_named({request.agent for request in requests if isinstance(request.agent, str)})
    # Asked once per submission, and only if a run would go to the critical tier.
    critical_allowed = functools.cache(lambda: not as_caller or user_may_submit_critical(user))
    built: list[Run] = []
    for index, request in enumerate(requests):
        try:
            built.append(
                _build_run(
                    request,
                    user=user,
                    agents=agents,
                    parent=parent,
                    critical_allowed=critical_allowed,
                    as_caller=as_caller,
                    inherits=inherits,
                )
            )
        except RunRejected as exc:
            if len(requests) == 1:
                raise
            raise type(exc)({"runs": {str(index): exc.errors}}) from exc
    if parent_round is not None:
        for index, run in enumerate(built):
            run.parent_round, run.sibling_index = parent_round, index
    _repeated_keys_agree(built)
    tier_given = {run.pk for run, request in zip(built, requests, strict=True) if request.tier is not None}
    # Runs that may share work: answered from the result cache, or following an identical run in flight.
    pairs = zip(built, requests, strict=True)
    shareable = [run for run, request in pairs if request.cache != "bypass" and run.agent.cache_ttl > 0]
    runs_answer_from_cache(shareable, charge=charge)
    shareable_ids = {run.pk for run in shareable}
    admitted = parent_round is not None
    try:
        return _insert_runs(
            user=user, runs=built, shareable=shareable_ids, tier_given=tier_given, admitted=admitted, charge=charge
        )
    except IntegrityError:
        # Another request inserted one of these idempotency keys first; now it is found.
        return _insert_runs(
            user=user, runs=built, shareable=shareable_ids, tier_given=tier_given, admitted=admitted, charge=charge
        )


def _same_request(first: Run, run: Run, *, tier_given: bool) -> bool:
    """Whether `run` asks for what `first` did: the same agent and input, and the same tier if it names one."""
    return first.agent_id == run.agent_id and first.input == run.input and (not tier_given or first.tier == run.tier)


def _repeated_keys_agree(runs: list[Run]) -> None:
    """Items of one batch that share an idempotency key must ask for the same run (they get one run)."""
    first: dict[str, int] = {}
    errors: dict[str, dict[str, list[str]]] = {}
    for index, run in enumerate(runs):
        key = run.idempotency_key
        if not key:
            continue
        earlier = first.setdefault(key, index)
        if earlier != index and not _same_request(runs[earlier], run, tier_given=True):
            message = "Items {} and {} share this idempotency key but ask for different agents, inputs or tiers."
            for item in (earlier, index):
                errors.setdefault(str(item), {"idempotency_key": [message.format(earlier, index)]})
    if errors:
        raise RunRejected({"runs": errors})


def _insert_runs(
    *, user, runs: list[Run], shareable: set, tier_given: set, admitted: bool = False, charge: RateCharge | None = None
) -> list[tuple[Run, bool]]:
    keys = {run.idempotency_key for run in runs if run.idempotency_key}
    # Only a lookup of idempotency keys must share a transaction with the insert; a lone INSERT is
    # atomic in itself, and skipping BEGIN and COMMIT saves a lone run two round trips.
    with transaction.atomic() if keys else contextlib.nullcontext():
        existing: dict[str, Run] = {}
        # Keys are per submitter; runs nobody submitted (topic runs without an origin) share one space.
        if keys:
            existing = {
                run.idempotency_key: run
                for run in Run.objects.select_related("agent").filter(submitted_by=user, idempotency_key__in=keys)
            }
        outcome: list[tuple[Run, bool]] = []
        new_runs: list[Run] = []
        for index, run in enumerate(runs):
            key = run.idempotency_key
            if key and key in existing:
                first = existing[key]
                if first.pk != run.pk and not _same_request(first, run, tier_given=run.pk in tier_given):
                    raise _conflict(first, index=index if len(runs) > 1 else None)
                outcome.append((first, False))
                continue
            if key:
                existing[key] = run
            new_runs.append(run)
            outcome.append((run, True))
        queued = [run for run in new_runs if run.status == RunStatus.QUEUED]
        runs_follow_inflight([run for run in queued if run.pk in shareable])
        # A follower takes no worker, so only the runs that will execute count against the backlog.
        executing = [run for run in queued if run.follows_id is None]
        reserved = _admit(executing, check=not admitted, charge=charge)
        if charge is not None and not charge.settled:
            # No round trip came before the insert for the charge to ride on.
            charge.take()
        ahead = _message_ahead(new_runs, executing, shareable=shareable)
        try:
            runs_insert(new_runs)
        except BaseException:
            if ahead is not None:
                ahead.withdraw()
            backlog_release(reserved)
            raise
        if ahead is not None and ahead.confirm():
            executing = []
        if new_runs:
            transaction.on_commit(lambda: _after_submit(new_runs, executing, shareable=shareable))
    return outcome


def _message_ahead(new_runs: list[Run], executing: list[Run], *, shareable: set) -> MessageAhead | None:
    """Send a lone run's message while it is inserted (see MessageAhead), when nothing must commit with it:
    outside a transaction (an idempotency key's, or a caller's), and not sharing another run's work."""
    if not settings.RUN_MESSAGE_AHEAD or len(new_runs) != 1 or executing != new_runs:
        return None
    if connection.in_atomic_block or new_runs[0].pk in shareable or not broker_is_platform_redis():
        return None
    return MessageAhead.send(new_runs[0])


@functools.lru_cache(maxsize=PLAIN_INSERT_ROWS_MAX)
def _insert_sql(rows: int) -> str:
    quote = connection.ops.quote_name
    fields = Run._meta.concrete_fields
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    columns = ", ".join(quote(field.column) for field in fields)
    return f"INSERT INTO {quote(Run._meta.db_table)} ({columns}) VALUES {', '.join([row] * rows)}"


@functools.cache
def _recordset_insert_sql() -> str:
    quote = connection.ops.quote_name
    fields = Run._meta.concrete_fields
    columns = ", ".join(quote(field.column) for field in fields)
    # Each row's keys are the fields' positions (c0, c1, …): a thousand rows repeat them a thousand times.
    typed = ", ".join(f"c{index} {field.db_type(connection)}" for index, field in enumerate(fields))
    keys = ", ".join(f"c{index}" for index in range(len(fields)))
    return (
        f"INSERT INTO {quote(Run._meta.db_table)} ({columns}) "
        f"SELECT {keys} FROM jsonb_to_recordset(%s::jsonb) AS r({typed})"
    )


def _recordset(runs: Sequence[Run]) -> str:
    """The runs as one JSON array of rows for jsonb_to_recordset; a NULL column is left out of its row."""
    fields = [(f"c{index}", field.attname) for index, field in enumerate(Run._meta.concrete_fields)]
    rows = [{key: value for key, attname in fields if (value := getattr(run, attname)) is not None} for run in runs]
    return json.dumps(rows, default=_json_scalar, separators=(",", ":"))


def _json_scalar(value: Any) -> str:
    # What a run's columns hold besides JSON's own types; PostgreSQL reads both back from text.
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value of a run")


def runs_insert(runs: Sequence[Run]) -> None:
    """Insert new runs, every field as built.

    A few runs (a lone submission, a small fan-out) go in one plain INSERT: the ORM's save() cost more
    than the INSERT itself, most of what a lone submission did. More go, on PostgreSQL, as one JSON
    document of rows that the server unpacks (jsonb_to_recordset): encoded in one call, where Django's
    bulk_create prepares each value of each row, and the driver then encodes an array per column.
    """
    if not runs:
        return
    fields = Run._meta.concrete_fields
    if len(runs) <= PLAIN_INSERT_ROWS_MAX:
        params = [field.get_db_prep_save(getattr(run, field.attname), connection) for run in runs for field in fields]
        with connection.cursor() as cursor:
            cursor.execute(_insert_sql(len(runs)), params)
    elif connection.vendor == "postgresql":
        connection.ensure_connection()
        # Bound on the server: a client-side cursor would quote the whole document into the statement.
        # Errors come out as Django's own (an IntegrityError is how a raced idempotency key is found).
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(_recordset_insert_sql(), [_recordset(runs)])
    else:
        Run.objects.bulk_create(runs)
        return
    for run in runs:
        run._state.adding, run._state.db = False, connection.alias


def _conflict(first: Run, *, index: int | None) -> IdempotencyConflict:
    errors = {
        "idempotency_key": [
            f"This key already names run {first.pk}, submitted with another agent, input or tier; "
            "use a new key for a new request."
        ],
        "run": str(first.pk),
    }
    return IdempotencyConflict(errors if index is None else {"runs": {str(index): errors}})


def _admit(runs: list[Run], *, check: bool = True, charge: RateCharge | None = None) -> Counter[str]:
    """Reserve the runs' places in their tier's, agent's and submitter's backlog, or refuse them all
    (AdmissionRefused).

    Returns the reservation, to be released if the runs are not stored after all.
    """
    reserved: Counter[str] = Counter()
    for run in runs:
        for field in backlog_fields(tier=run.tier, agent=run.agent.name, user=run.submitted_by_id):
            reserved[field] += 1
    higher = {tier_field(other) for run in runs for other in HIGHER_TIERS[Tier(run.tier)]}
    counts = backlog_reserve(reserved, also=higher, charge=charge) if runs else None
    if counts is None or not check:
        return reserved if counts is not None else Counter()
    try:
        _admission_check(runs, counts, drain=lambda runs: 0.0)
    except AdmissionRefused as refused:
        backlog_release(reserved)
        runs_refused_record(runs, reason=refused.reason)
        admission_refusals_record(Counter(str(run.tier) for run in runs))
        # Only a refusal needs to know how fast the backlog drains (for Retry-After): count it now.
        _admission_check(runs, counts, drain=_drain_per_second)
        raise
    return reserved


def _admission_check(
    runs: list[Run], counts: dict[str, int], *, drain: Callable[[Callable[[], QuerySet[Run]]], float]
) -> None:
    """Refuse the runs (AdmissionRefused) if a backlog they join is full; `drain` tells how fast the runs of a
    query (built only if it is asked for) finish, for a refusal's Retry-After."""
    yield_fraction = settings.ADMISSION_BATCH_YIELD_FRACTION
    for tier in {Tier(run.tier) for run in runs}:
        in_tier = [run for run in runs if run.tier == tier]
        backlogs = {
            other: Backlog(
                queued=counts[tier_field(other)],
                limit=settings.TIER_BACKLOG_LIMITS[other.value],
                drain_per_second=drain(lambda other=other: Run.objects.filter(tier=other)),
            )
            for other in (tier, *HIGHER_TIERS[tier])
        }
        # An agent with its own backlog limit is held to that limit instead of the tier's.
        by_agent = Counter(run.agent for run in in_tier if run.agent.backlog_limit is not None)
        for agent, incoming in by_agent.items():
            own = Backlog(
                queued=counts[agent_field(agent.name)],
                limit=agent.backlog_limit,
                drain_per_second=drain(lambda agent=agent: Run.objects.filter(agent=agent)),
            )
            admission_check(
                tier=tier, incoming=incoming, backlogs={**backlogs, tier: own},
                yield_fraction=yield_fraction, label=f"agent {agent.name!r}",
            )  # fmt: skip
        if incoming := len(in_tier) - by_agent.total():
            admission_check(tier=tier, incoming=incoming, backlogs=backlogs, yield_fraction=yield_fraction)
        # No one user may hold more than a share of the tier's backlog, so that others still get in.
        by_user = Counter(run.submitted_by_id for run in in_tier if run.submitted_by_id is not None)
        for user, incoming in by_user.items():
            share = settings.BACKLOG_USER_SHARE
            mine = Backlog(
                queued=counts[user_field(user, tier)],
                limit=share_limit(tier_limit=settings.TIER_BACKLOG_LIMITS[tier.value], share=share),
                drain_per_second=drain(
                    lambda tier=tier, user=user: Run.objects.filter(tier=tier, submitted_by_id=user)
                ),
            )
            share_check(tier=tier, incoming=incoming, backlog=mine, share=share)


def _drain_per_second(runs: Callable[[], QuerySet[Run]]) -> float:
    window = settings.ADMISSION_DRAIN_WINDOW_SECONDS
    finished = runs().filter(finished_at__gte=timezone.now() - timedelta(seconds=window)).count()
    return finished / window


def _after_submit(runs: list[Run], executing: list[Run], *, shareable: set) -> None:
    """After commit: the runs' events and message markers in one round trip, then their messages."""
    pipe = redis_client().pipeline(transaction=False)
    events.queue_run_events(
        pipe,
        (events.event_of_run(run, "queued" if run.status == RunStatus.QUEUED else "succeeded") for run in runs),
        new=True,
    )
    # Followers from before the insert: their leader may have ended before they were committed.
    followers = [run for run in runs if run.follows_id is not None]
    try:
        leading = runs_lead([run for run in executing if run.pk in shareable])
        run_dispatch([run for run in executing if run.pk not in shareable] + leading, pipe=pipe)
        followed_settle(followers)
    except Exception:
        # The runs are stored and stay queued: the caller must not see a failure and submit them again.
        logger.exception("could not dispatch %d queued runs; they stay queued until re-dispatched", len(executing))
    runs_submitted_record(runs)


def run_rerun(*, run: Run, user) -> Run:
    """Submit a new run of the same agent, input and tier as `run`, on behalf of `user`."""
    new_run, _ = run_submit(user=user, request=RunRequest(agent=run.agent.name, input=run.input, tier=run.tier))
    return new_run
