"""Domain errors raised by the run services; the API maps each to a status code in one place."""


class RunRejected(Exception):
    """A submission that cannot become a run; `errors` maps field names to messages."""

    status_code = 400

    def __init__(self, errors: dict) -> None:
        super().__init__(errors)
        self.errors = errors


class PayloadTooLarge(RunRejected):
    status_code = 413


class TierNotPermitted(RunRejected):
    """The caller lacks the permission that the requested tier needs."""

    status_code = 403


class IdempotencyConflict(RunRejected):
    """An idempotency key already names a run of another agent, input or tier; `errors` names that run."""

    status_code = 409


class RunNotCancellable(Exception):
    """The run already finished."""

    def __init__(self, status: str) -> None:
        super().__init__(f"the run already finished ({status}) and cannot be cancelled")
        self.status = status


class RunNotWaiting(Exception):
    """A signal for a run that does not wait for it (it waits for another, or for nothing)."""

    def __init__(self, *, status: str, name: str, waits_for: str | None) -> None:
        if waits_for:
            message = f"the run waits for the signal {waits_for!r}, not {name!r}"
        else:
            message = f"the run is {status} and waits for no signal"
        super().__init__(message)
        self.status, self.waits_for = status, waits_for


class AgentNotRegistered(Exception):
    """A run names an agent that the code no longer declares."""


class RunCancelled(BaseException):
    """Raised inside a running agent when its run is cancelled.

    A BaseException, so that agent code catching Exception cannot swallow it.
    """
