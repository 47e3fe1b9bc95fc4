from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from agents.models import Agent, Run, RunStatus


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = factory.django.Password("secret-password")


class StaffFactory(UserFactory):
    is_staff = True
    is_superuser = True


class RunFactory(factory.django.DjangoModelFactory):
    """A run of the built-in echo agent, recorded as a submission would record it."""

    class Meta:
        model = Run

    agent = factory.LazyFunction(lambda: Agent.objects.get(name="echo"))
    agent_version = factory.SelfAttribute("agent.version")
    tier = factory.SelfAttribute("agent.tier")
    input = factory.Dict({"text": "hello"})
    submitted_by = factory.SubFactory(UserFactory)
    sla_seconds = factory.SelfAttribute("agent.sla_seconds")
    soft_time_limit = factory.SelfAttribute("agent.soft_time_limit")
    time_limit = factory.SelfAttribute("agent.time_limit")
    max_retries = factory.SelfAttribute("agent.max_retries")
    submitted_at = factory.LazyFunction(timezone.now)
    deadline = factory.LazyAttribute(lambda run: run.submitted_at + timedelta(seconds=run.sla_seconds))

    class Params:
        # Succeeded within its SLA, with timings consistent with queue_wait_ms and run_ms (override any of them).
        finished = factory.Trait(
            status=RunStatus.SUCCEEDED,
            queue_wait_ms=10,
            run_ms=100,
            sla_met=True,
            started_at=factory.LazyAttribute(lambda run: run.submitted_at + timedelta(milliseconds=run.queue_wait_ms)),
            finished_at=factory.LazyAttribute(lambda run: run.started_at + timedelta(milliseconds=run.run_ms)),
        )
