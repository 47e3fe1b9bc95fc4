"""The tree agent of the fault drills, loaded by the drill processes (only) through AGENT_MODULES.

`drill.tree` builds a tree of runs: a run with `fanouts` [10, 10] delegates to ten runs with [10], each of
which delegates to ten leaves; a leaf works `seconds` and counts 1, and each inner run's continuation adds
up its children's counts. Every step notes its executions (see executions.py), under an event naming the
step: `leaf.*` for a leaf's work, `delegate.*` for an inner run's first step, `gather.*` for its
continuation. A run id with two `<step>.done` lines had that step's work done twice.
"""

import time

from pydantic import BaseModel, Field

from agents.registry import agent, continuation
from tests.drills.executions import note

LEAF, DELEGATE, GATHER = "leaf", "delegate", "gather"


class TreeInput(BaseModel):
    tag: str = Field(max_length=100, description="Names the drill the tree belongs to.")
    fanouts: list[int] = Field(
        default_factory=list, max_length=3, description="Children of each level below this run; none: a leaf."
    )
    seconds: float = Field(default=0.0, ge=0, le=5, description="How long each leaf works (sleeps).")


@agent(name="drill.tree", input=TreeInput, soft_time_limit=5, time_limit=10, max_retries=0)
def tree(ctx, input: TreeInput) -> object:
    """A leaf works `seconds` and counts 1; an inner run delegates one level down and adds up the counts."""
    if not input.fanouts:
        note(f"{LEAF}.start", ctx)
        time.sleep(input.seconds)
        note(f"{LEAF}.done", ctx)
        return {"leaves": 1}
    note(f"{DELEGATE}.start", ctx)
    width, below = input.fanouts[0], input.fanouts[1:]
    child = {"tag": input.tag, "fanouts": below, "seconds": input.seconds}
    delegation = ctx.delegate([("drill.tree", child)] * width, then=tree_gather, state={"width": width})
    note(f"{DELEGATE}.done", ctx)
    return delegation


@continuation
def tree_gather(ctx, input: TreeInput, wake) -> dict:
    note(f"{GATHER}.start", ctx)
    if len(wake.children) != wake.state["width"]:
        raise RuntimeError(f"gathered {len(wake.children)} children of {wake.state['width']} delegated")
    leaves = sum(result["leaves"] for result in wake.results)
    note(f"{GATHER}.done", ctx)
    return {"leaves": leaves}
