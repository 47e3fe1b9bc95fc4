import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from agents.tuning import agent_tuning_forget
from scheduling.tiers import Tier


class AgentQuerySet(models.QuerySet):
    """Changes made in bulk reach this process's submissions at once, as saves do (agents/tuning.py)."""

    def update(self, **kwargs) -> int:
        count = super().update(**kwargs)
        agent_tuning_forget()
        return count

    def delete(self):
        deleted = super().delete()
        agent_tuning_forget()
        return deleted


class Agent(models.Model):
    """An agent declared in code, with the tunables operators may change.

    The row names an agent; it never names code. Workers run only what the registry holds
    under that name, so nothing stored here can make them run anything else.
    """

    name = models.CharField(max_length=100, unique=True)
    version = models.CharField(max_length=50, help_text="Declared in code; set by the registry sync.")
    description = models.TextField(blank=True)
    input_schema = models.JSONField(default=dict, help_text="JSON Schema of the input, from the code.")
    registered = models.BooleanField(
        default=True, help_text="Whether the code still declares this agent (false: it cannot run)."
    )
    tier = models.CharField(max_length=16, choices=Tier.choices, default=Tier.STANDARD)
    sla_seconds = models.FloatField(help_text="Submit-to-finish time the agent promises.")
    soft_time_limit = models.FloatField(help_text="Seconds before the agent is asked to stop.")
    time_limit = models.FloatField(help_text="Seconds before the agent's process is killed.")
    max_retries = models.PositiveSmallIntegerField(default=0, help_text="Attempts after the first.")
    cache_ttl = models.PositiveIntegerField(default=0, help_text="Seconds a result is reused; 0: not cached.")
    enabled = models.BooleanField(default=True, help_text="Disabled agents refuse new runs.")
    backlog_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Queued runs of this agent beyond which submissions get 429 (default: the tier's limit).",
    )
    concurrency_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Runs of this agent running at once across all workers (empty: no limit)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = AgentQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(sla_seconds__gt=0), name="agent_sla_positive"),
            models.CheckConstraint(condition=Q(soft_time_limit__gt=0), name="agent_soft_limit_positive"),
            models.CheckConstraint(
                condition=Q(time_limit__gte=F("soft_time_limit")), name="agent_hard_limit_not_below_soft"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    # Holds no worker: waits for its children to end, a signal, or a time, then goes on where it left off.
    WAITING = "waiting", "Waiting"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    EXPIRED = "expired", "Expired"

    @classmethod
    def terminal(cls) -> frozenset["RunStatus"]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.CANCELLED, cls.EXPIRED})


IN_FLIGHT = Q(status__in=[RunStatus.QUEUED, RunStatus.RUNNING])


class SlaMiss(models.TextChoices):
    QUEUE_WAIT = "queue_wait", "Queue wait"
    RUN_TIME = "run_time", "Run time"


class Run(models.Model):
    """One request to execute an agent, and everything that happened to it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed with the submission time (run_agent_newest), not alone: every index costs each write of a run.
    agent = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="runs", db_index=False)
    agent_version = models.CharField(max_length=50)
    tier = models.CharField(max_length=16, choices=Tier.choices)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    input = models.JSONField()
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True, help_text="type, message and traceback of the last failure.")
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs", db_index=False
    )
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="children",
        db_index=False,
        help_text="The run whose agent submitted this one.",
    )
    follows = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="followers",
        db_index=False,
        help_text="The identical run already in flight whose execution this run shares instead of running.",
    )
    # NULL, not '', for no key: the unique constraint must not see two keyless runs as equal.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    # The agent's promises as they stood at submission, so that tuning an agent never rewrites history.
    sla_seconds = models.FloatField()
    soft_time_limit = models.FloatField()
    time_limit = models.FloatField()
    max_retries = models.PositiveSmallIntegerField()
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Attempts started so far.")
    # Multi-agent work: a run that delegated waits, its children counted down as they end.
    round = models.PositiveSmallIntegerField(
        default=0, help_text="How many times this run has delegated, waited for a signal or slept."
    )
    pending_children = models.PositiveIntegerField(
        default=0, help_text="Children of the current round still to end; the run goes on when none is left."
    )
    resume = models.JSONField(
        null=True, blank=True, help_text="What the run goes on with when it wakes: its continuation and state."
    )
    wake_at = models.DateTimeField(
        null=True, blank=True, help_text="A waiting run goes on by then whatever happened (a timer, a timeout)."
    )
    signal = models.JSONField(null=True, blank=True, help_text="The signal (name and payload) that woke the run.")
    root = models.UUIDField(
        null=True, blank=True, help_text="The run at the top of this run's tree (empty for a run with no parent)."
    )
    parent_round = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="For a child its parent gathers: the parent's round it belongs to."
    )
    sibling_index = models.PositiveIntegerField(
        null=True, blank=True, help_text="For a child its parent gathers: its place among its siblings."
    )
    lost_attempts = models.PositiveSmallIntegerField(
        default=0, help_text="Of those, attempts lost because their worker died: they do not spend the agent's retries."
    )
    submitted_at = models.DateTimeField(default=timezone.now)
    deadline = models.DateTimeField(help_text="submitted_at + SLA, or the client's earlier deadline.")
    expires_at = models.DateTimeField(null=True, blank=True, help_text="A run not started by then ends expired.")
    escalate_at = models.DateTimeField(
        null=True, blank=True, help_text="If still queued then, a standard run is also offered to the critical pool."
    )
    escalated_at = models.DateTimeField(
        null=True, blank=True, help_text="When the run was also dispatched on the critical queue to keep its SLA."
    )
    started_at = models.DateTimeField(null=True, blank=True, help_text="Start of the latest attempt.")
    finished_at = models.DateTimeField(null=True, blank=True)
    queue_wait_ms = models.PositiveBigIntegerField(null=True, blank=True, help_text="Submission to first start.")
    run_ms = models.PositiveBigIntegerField(null=True, blank=True, help_text="Duration of the final attempt.")
    sla_met = models.BooleanField(null=True, blank=True)
    cached = models.BooleanField(default=False, help_text="Answered from the result cache, without running.")
    sla_miss = models.CharField(
        max_length=16, choices=SlaMiss.choices, blank=True, help_text="For a missed SLA: the part that overran."
    )
    attempt_errors = models.JSONField(
        default=list,
        blank=True,
        help_text="The error of each failed attempt (attempt, type, message, traceback), oldest first.",
    )
    log = models.TextField(
        blank=True, default="", help_text="What the agent logged through ctx.logger, cut at RUN_LOG_MAX_BYTES."
    )
    worker = models.CharField(max_length=200, blank=True, help_text="Worker that holds or held the claim.")
    lease_expires_at = models.DateTimeField(
        null=True, blank=True, help_text="Until then the claim is the worker's; after it the run may be reclaimed."
    )

    class Meta:
        ordering = ["-submitted_at"]
        # Granted in the admin to users or groups; staff always have it.
        permissions = [("submit_critical", "Can submit runs to the critical tier")]
        constraints = [
            models.UniqueConstraint(
                fields=["submitted_by", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="run_idempotency_key_unique_per_user",
            ),
        ]
        # Every index gains an entry each time a run changes state (status is indexed, so no update is
        # HOT), and a run changes state three times: indexes on in-flight states are partial, so a
        # finished run leaves them, and only four indexes hold every row.
        indexes = [
            models.Index(fields=["submitted_by", "-submitted_at"], name="run_owner_newest"),
            models.Index(fields=["agent", "-submitted_at"], name="run_agent_newest"),
            models.Index(fields=["submitted_at"], name="run_submitted"),
            models.Index(fields=["finished_at"], name="run_finished", condition=Q(finished_at__isnull=False)),
            models.Index(fields=["status", "tier", "submitted_at"], name="run_in_flight", condition=IN_FLIGHT),
            models.Index(fields=["lease_expires_at"], name="run_running_lease", condition=Q(status=RunStatus.RUNNING)),
            models.Index(
                fields=["expires_at"],
                name="run_queued_expiry",
                condition=Q(status=RunStatus.QUEUED, expires_at__isnull=False),
            ),
            models.Index(
                fields=["escalate_at"],
                name="run_escalation_due",
                condition=Q(
                    status=RunStatus.QUEUED, tier=Tier.STANDARD, escalated_at__isnull=True, escalate_at__isnull=False
                ),
            ),
            models.Index(fields=["parent"], name="run_parent", condition=Q(parent__isnull=False)),
            models.Index(fields=["wake_at"], name="run_waiting_wake", condition=Q(status=RunStatus.WAITING)),
            models.Index(fields=["root"], name="run_tree", condition=Q(root__isnull=False)),
            models.Index(fields=["follows", "status"], name="run_follows", condition=Q(follows__isnull=False)),
        ]

    def __str__(self) -> str:
        return str(self.id)

    @property
    def is_terminal(self) -> bool:
        return self.status in RunStatus.terminal()


class RunSchedule(models.Model):
    """A standing order to run an agent on an input, by cron expression or every so many seconds.

    Each firing submits one normal run on the owner's behalf. Beat reads the linked PeriodicTask,
    which agents.schedules keeps in step with this row; edit schedules through those services.
    """

    name = models.CharField(max_length=100, unique=True)
    agent = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="schedules")
    input = models.JSONField(default=dict, blank=True, help_text="The input of every run, a JSON object.")
    # NULL, not '', for no tier: the choice is "the agent's tier at firing time", not an empty tier.
    tier = models.CharField(  # noqa: DJ001
        max_length=16,
        choices=Tier.choices,
        null=True,
        blank=True,
        help_text="Tier of the runs (empty: the agent's tier when the schedule fires).",
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="run_schedules",
        help_text="Runs are submitted on this user's behalf, so they see them in the API.",
    )
    enabled = models.BooleanField(default=True, help_text="Disabled schedules do not fire.")
    cron = models.CharField(
        max_length=200,
        blank=True,
        help_text='Crontab expression in UTC: minute hour day-of-month month day-of-week (e.g. "0 6 * * 1-5").',
    )
    interval_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Fire every this many seconds (instead of a cron expression)."
    )
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        editable=False,
        related_name="run_schedule",
        help_text="The beat entry that fires this schedule; kept in step by agents.schedules.",
    )
    last_run = models.ForeignKey(
        Run,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        editable=False,
        related_name="+",
        help_text="The run submitted by the latest firing.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(cron="") & Q(interval_seconds__isnull=False))
                | (~Q(cron="") & Q(interval_seconds__isnull=True)),
                name="run_schedule_cron_xor_interval",
                violation_error_message="Give either a cron expression or an interval, not both.",
            ),
            models.CheckConstraint(
                condition=Q(interval_seconds__isnull=True) | Q(interval_seconds__gt=0),
                name="run_schedule_interval_positive",
            ),
        ]

    def __str__(self) -> str:
        return self.name
