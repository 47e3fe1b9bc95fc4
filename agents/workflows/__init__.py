"""Workflows declared in code: a DAG of steps, each an agent's run, registered and started like any agent.

    workflow(
        name="corpus.report", input=ReportInput,
        steps=[
            Step("split", agent="corpus.split", input={"text": ref("input.text")}),
            Step("analyse", agent="text_stats", map=ref("split.documents"), input={"text": ref("item")}),
            Step("report", agent="corpus.aggregate", input={"analyses": ref("analyse")}),
        ],
    )

A step's input is a JSON template whose `ref(...)` values are filled in when the step starts:
`ref("input.a.b")` from the workflow's input, `ref("<step>.a.b")` from an upstream step's result,
`ref("item")` (in a step with `map=`) from the item of the list it maps over. A step with `map=`
runs once per item; its result, for the steps below, is the list of those results. A step runs
once every step it refers to (or names in `after=`) has succeeded. The workflow's result is the
result of its last steps (those no other step waits for), by name, and what its steps cost:
how many runs were computed, answered from the cache, or shared with an identical run in flight.

Declaring a cycle, an unknown agent, or a reference to a step that the workflow does not have
fails when the module is imported, naming the step. A workflow's execution is a tree of runs:
the workflow's run delegates the steps that are ready, waits holding no worker, and goes on
when they have ended; submit, cancel, events, idempotency, admission, the cache and coalescing
are those of runs.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from agents.registry import RegistryError, agent, continuation, registry
from agents.runs.delegation import Child
from scheduling.tiers import Tier

__all__ = ["Step", "ref", "workflow"]


@dataclass(frozen=True)
class Ref:
    """A place in the workflow's input, an upstream step's result, or a mapped item."""

    path: str

    @property
    def step(self) -> str | None:
        head = self.path.split(".", 1)[0]
        return None if head in ("input", "item") else head


def ref(path: str) -> Ref:
    return Ref(path)


@dataclass(frozen=True)
class Step:
    name: str
    agent: str
    input: dict[str, Any] = field(default_factory=dict)
    map: Ref | None = None
    after: Sequence[str] = ()
    tier: str | None = None

    def upstream(self) -> set[str]:
        refs = _refs(self.input) + ([self.map] if self.map is not None else [])
        return {ref.step for ref in refs if ref.step is not None} | set(self.after)


def _refs(template: Any) -> list[Ref]:
    if isinstance(template, Ref):
        return [template]
    if isinstance(template, dict):
        return [found for value in template.values() for found in _refs(value)]
    if isinstance(template, list | tuple):
        return [found for value in template for found in _refs(value)]
    return []


@dataclass(frozen=True)
class Workflow:
    name: str
    steps: dict[str, Step]

    @property
    def sinks(self) -> list[str]:
        waited_for = {name for step in self.steps.values() for name in step.upstream()}
        return [name for name in self.steps if name not in waited_for]

    def ready(self, done: set[str], started: set[str]) -> list[Step]:
        return [step for name, step in self.steps.items() if name not in started and step.upstream() <= done]


WORKFLOWS: dict[str, Workflow] = {}


def workflow(
    *,
    name: str,
    input: type[BaseModel],
    steps: Sequence[Step],
    version: str = "1",
    description: str = "",
    tier: Tier | str = Tier.STANDARD,
    sla_seconds: float | None = None,
) -> Workflow:
    """Declare a workflow: validated now (naming the faulty step), then registered as an agent of its own."""
    flow = Workflow(name=name, steps=_validated(name, steps))
    WORKFLOWS[name] = flow
    agent(
        name=name, input=input, version=version, description=description or f"Workflow of {len(steps)} steps.",
        tier=tier, sla_seconds=sla_seconds, soft_time_limit=60, time_limit=90,
    )(_start)  # fmt: skip
    return flow


def _validated(name: str, steps: Sequence[Step]) -> dict[str, Step]:
    by_name: dict[str, Step] = {}
    for step in steps:
        if step.name in by_name:
            raise RegistryError(f"workflow {name!r}: step {step.name!r} is declared twice")
        if step.name in ("input", "item"):
            raise RegistryError(f"workflow {name!r}: a step cannot be named {step.name!r}")
        # The agents of a workflow are declared before it (its own module, or one it imports).
        if step.agent not in registry._specs:
            raise RegistryError(f"workflow {name!r}: step {step.name!r} names agent {step.agent!r}, not declared")
        by_name[step.name] = step
    for step in steps:
        for upstream in sorted(step.upstream()):
            if upstream not in by_name:
                raise RegistryError(
                    f"workflow {name!r}: step {step.name!r} refers to {upstream!r}, which is not a step of the workflow"
                )
        if any(ref.path == "item" or ref.path.startswith("item.") for ref in _refs(step.input)) and step.map is None:
            raise RegistryError(f"workflow {name!r}: step {step.name!r} refers to `item` but maps over nothing")
    cycle = _cycle(by_name)
    if cycle:
        raise RegistryError(f"workflow {name!r}: steps {' -> '.join(cycle)} form a cycle")
    if not by_name:
        raise RegistryError(f"workflow {name!r} has no steps")
    return by_name


def _cycle(steps: dict[str, Step]) -> list[str]:
    """A cycle among the steps (as the path that closes it), or [] when they form a DAG."""
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str]:
        state[name] = 1
        for upstream in sorted(steps[name].upstream()):
            if state.get(upstream) == 1:
                return [*path[path.index(upstream) :], upstream] if upstream in path else [name, upstream]
            if upstream not in state and (found := visit(upstream, [*path, upstream])):
                return found
        state[name] = 2
        return []

    for name in steps:
        if name not in state and (found := visit(name, [name])):
            return found
    return []


def _lookup(value: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value[part]
        else:
            raise KeyError(part)
    return value


def _filled(template: Any, *, scope: dict[str, Any]) -> Any:
    if isinstance(template, Ref):
        head, _, rest = template.path.partition(".")
        try:
            return _lookup(scope[head], rest)
        except (KeyError, IndexError, ValueError) as exc:
            raise StepInputError(f"{template.path!r} is not in what the workflow has so far") from exc
    if isinstance(template, dict):
        return {key: _filled(value, scope=scope) for key, value in template.items()}
    if isinstance(template, list | tuple):
        return [_filled(value, scope=scope) for value in template]
    return template


class StepInputError(Exception):
    """A step's input refers to something its upstream steps did not produce."""


def _start(ctx, input: BaseModel) -> Any:
    flow = WORKFLOWS[ctx.run.agent.name]
    state = {"outputs": {}, "started": [], "costs": {"computed": 0, "cached": 0, "coalesced": 0}, "pending": []}
    return _advance(ctx, flow, input.model_dump(mode="json"), state)


@continuation
def workflow_advance(ctx, input: BaseModel, wake) -> Any:
    """Take the outcomes of the steps that ran, then start the steps they made ready, or finish."""
    flow = WORKFLOWS[ctx.run.agent.name]
    state = wake.state
    position = 0
    for step_name, count, mapped in state["pending"]:
        outcomes = wake.children[position : position + count]
        position += count
        results = [outcome.result for outcome in outcomes]
        state["outputs"][step_name] = results if mapped else results[0]
        for outcome in outcomes:
            kind = "cached" if outcome.cached else "coalesced" if outcome.followed else "computed"
            state["costs"][kind] += 1
    state["pending"] = []
    return _advance(ctx, flow, input.model_dump(mode="json"), state)


def _advance(ctx, flow: Workflow, workflow_input: dict[str, Any], state: dict[str, Any]) -> Any:
    done = set(state["outputs"])
    ready = flow.ready(done, set(state["started"]))
    if not ready:
        return {"outputs": {name: state["outputs"][name] for name in flow.sinks}, "steps": state["costs"]}
    children = []
    scope = {"input": workflow_input, **state["outputs"]}
    for step in ready:
        if step.map is not None:
            items = _filled(step.map, scope=scope)
            if not isinstance(items, list):
                raise StepInputError(f"step {step.name!r} maps over {step.map.path!r}, which is not a list")
            inputs = [_filled(step.input, scope={**scope, "item": item}) for item in items]
        else:
            inputs = [_filled(step.input, scope=scope)]
        state["pending"].append([step.name, len(inputs), step.map is not None])
        state["started"].append(step.name)
        children += [(step.agent, step_input, step.tier) for step_input in inputs]
    if not children:
        # Every ready step maps over an empty list: their results are empty lists, and the next steps may start.
        for step_name, _, _ in state["pending"]:
            state["outputs"][step_name] = []
        state["pending"] = []
        return _advance(ctx, flow, workflow_input, state)
    return ctx.delegate(
        [Child(agent=name, input=step_input, tier=tier) for name, step_input, tier in children],
        then=workflow_advance,
        state=state,
    )
