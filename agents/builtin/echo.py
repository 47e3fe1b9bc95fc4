from typing import Any

from pydantic import BaseModel, ConfigDict

from agents.registry import agent


class EchoInput(BaseModel):
    """Any JSON object."""

    model_config = ConfigDict(extra="allow")


@agent(name="echo", input=EchoInput, soft_time_limit=10, time_limit=15)
def echo(ctx, input: EchoInput) -> dict[str, Any]:
    """Return the input unchanged."""
    return input.model_dump(mode="json")
