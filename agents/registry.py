"""The agent registry: code declares agents with @agent; the database only tunes them."""

import importlib
import inspect
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.utils.module_loading import autodiscover_modules
from pydantic import BaseModel

from agentplatform.events import TOPIC_PATTERN
from scheduling.tiers import DEFAULT_SLA_SECONDS, Tier

AGENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,99}$")
BUILTIN_MODULES = (
    "agents.builtin.echo",
    "agents.builtin.sleep",
    "agents.builtin.spin",
    "agents.builtin.text_stats",
    "agents.builtin.factorize",
    # Last: its workflow names the agents above.
    "agents.builtin.corpus",
)


class RegistryError(Exception):
    """An agent declaration is invalid or clashes with another."""


@dataclass(frozen=True)
class AgentSpec:
    """What the code promises about one agent; the defaults its Agent row starts from."""

    name: str
    version: str
    description: str
    input_model: type[BaseModel]
    func: Callable[..., Any] = field(compare=False)
    tier: Tier = Tier.STANDARD
    sla_seconds: float = 60.0
    soft_time_limit: float = 60.0
    time_limit: float = 90.0
    max_retries: int = 0
    cache_ttl: int = 0
    # Agent topics this agent reacts to: the dispatcher submits one run per message, the message as input.
    topics: tuple[str, ...] = ()
    # Input fields the models do not declare are refused, unless one of the models chose for itself
    # (`extra` in its model_config): then every model's own choice stands.
    refuse_undeclared_fields: bool = True

    @property
    def input_schema(self) -> dict[str, Any]:
        schema = self.input_model.model_json_schema()
        return _closed(schema) if self.refuse_undeclared_fields else schema

    def parse_input(self, data: Any, *, lenient: bool = False) -> BaseModel:
        """Validate raw input against the declared schema (raises pydantic.ValidationError).

        A field the schema does not declare is an error (`extra_forbidden`), unless the models say
        otherwise or `lenient` asks for such fields to be dropped (pydantic's own default).
        """
        refuse = self.refuse_undeclared_fields and not lenient
        return self.input_model.model_validate(data, extra="forbid" if refuse else None)


def declares_extra(model: type[BaseModel]) -> bool:
    """Whether the model, or a model nested in its fields, sets `extra` in its model_config."""
    # The core schema holds every nested model inline, each with its own config.
    stack: list[Any] = [model.__pydantic_core_schema__]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "model" and "extra_fields_behavior" in node.get("config", {}):
                return True
            stack.extend(value for key, value in node.items() if key != "metadata")
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


def _closed(schema: Any) -> Any:
    """A JSON Schema whose objects with declared properties admit no others (what parse_input enforces)."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if closed.get("type") == "object" and isinstance(closed.get("properties"), dict):
        closed.setdefault("additionalProperties", False)
    return closed


class AgentRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, AgentSpec] = {}
        self._continuations: dict[str, Callable[..., Any]] = {}
        self._discovered = False
        self._discovering = threading.RLock()

    def register(self, spec: AgentSpec) -> None:
        existing = self._specs.get(spec.name)
        # Re-importing the same module (autoreload, tests) declares the same function again: fine.
        if existing is not None and _qualified_name(existing.func) != _qualified_name(spec.func):
            raise RegistryError(f"agent {spec.name!r} is declared twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> AgentSpec | None:
        self.discover()
        return self._specs.get(name)

    def register_continuation(self, func: Callable[..., Any]) -> str:
        name = continuation_name(func)
        self._continuations[name] = func
        return name

    def continuation(self, name: str) -> Callable[..., Any] | None:
        """The continuation declared in code under `name`; a run's row names one, never arbitrary code."""
        self.discover()
        return self._continuations.get(name)

    def __iter__(self) -> Iterator[AgentSpec]:
        self.discover()
        return iter(sorted(self._specs.values(), key=lambda spec: spec.name))

    def __len__(self) -> int:
        self.discover()
        return len(self._specs)

    def reacting_to(self) -> dict[str, list[str]]:
        """Topic name -> the agents that react to it."""
        topics: dict[str, list[str]] = {}
        for spec in self:
            for topic in spec.topics:
                topics.setdefault(topic, []).append(spec.name)
        return topics

    def discover(self) -> None:
        """Import the built-in agents, every installed app's agents.py and settings.AGENT_MODULES."""
        if self._discovered:
            return
        # Threads of a web process asking at once must all wait for the whole registry.
        with self._discovering:
            if self._discovered:
                return
            for module in BUILTIN_MODULES:
                importlib.import_module(module)
            autodiscover_modules("agents")
            for module in settings.AGENT_MODULES:
                importlib.import_module(module)
            self._discovered = True


def _qualified_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def continuation_name(func: Callable[..., Any]) -> str:
    return _qualified_name(func)


registry = AgentRegistry()


def agent(
    *,
    name: str,
    input: type[BaseModel],
    version: str = "1",
    description: str | None = None,
    tier: Tier | str = Tier.STANDARD,
    sla_seconds: float | None = None,
    soft_time_limit: float = 60.0,
    time_limit: float | None = None,
    max_retries: int = 0,
    cache_ttl: int = 0,
    topics: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a function `fn(ctx, input) -> JSON-serialisable` as an agent."""
    tier = Tier(tier)
    if not AGENT_NAME_PATTERN.match(name):
        raise RegistryError(f"agent name {name!r} must match {AGENT_NAME_PATTERN.pattern}")
    if not (isinstance(input, type) and issubclass(input, BaseModel)):
        raise RegistryError(f"agent {name!r}: input must be a pydantic model class")
    hard_limit = time_limit if time_limit is not None else soft_time_limit * 1.5
    if soft_time_limit <= 0 or hard_limit < soft_time_limit:
        raise RegistryError(f"agent {name!r}: need 0 < soft_time_limit <= time_limit")
    if max_retries < 0 or cache_ttl < 0:
        raise RegistryError(f"agent {name!r}: max_retries and cache_ttl cannot be negative")
    if isinstance(topics, str):
        raise RegistryError(f"agent {name!r}: topics must be a list of topic names, not one string")
    for topic in topics:
        if not isinstance(topic, str) or not TOPIC_PATTERN.match(topic):
            raise RegistryError(f"agent {name!r}: topic {topic!r} must match {TOPIC_PATTERN.pattern}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        registry.register(
            AgentSpec(
                name=name,
                version=str(version),
                description=description or inspect.cleandoc(func.__doc__ or ""),
                input_model=input,
                func=func,
                tier=tier,
                sla_seconds=float(sla_seconds if sla_seconds is not None else DEFAULT_SLA_SECONDS[tier]),
                soft_time_limit=float(soft_time_limit),
                time_limit=float(hard_limit),
                max_retries=int(max_retries),
                cache_ttl=int(cache_ttl),
                topics=tuple(topics),
                refuse_undeclared_fields=not declares_extra(input),
            )
        )
        return func

    return decorate


def continuation(func: Callable[..., Any]) -> Callable[..., Any]:
    """Declare `fn(ctx, input, wake) -> result or another delegation` as a continuation: what a run goes on
    with when the children it delegated to have ended, a signal came, or a timer rang (see RunContext)."""
    registry.register_continuation(func)
    return func
