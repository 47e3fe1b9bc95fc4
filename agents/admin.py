"""The operators' view: the dashboard, tune agents, follow runs, cancel or repeat them."""

import json
import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import redis
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.defaultfilters import pluralize
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from agents import dashboard
from agents.errors import RunNotCancellable, RunRejected
from agents.models import Agent, Run, RunSchedule
from agents.registry import registry
from agents.retention import retention_last_purge
from agents.runs.cancellation import run_cancel
from agents.runs.submit import run_rerun
from agents.schedules import schedule_delete, schedule_errors, schedule_save
from agents.stats import StatsBlock, agent_stats
from agents.topics import topic_stats
from agents.tree_picture import run_tree_picture
from caching.results import result_cache_clear
from scheduling.admission import AdmissionRefused

logger = logging.getLogger(__name__)

# The admin's home page links to the dashboard.
admin.site.index_template = "admin/agents/index.html"

# The window of the agent list's SLA and run-time columns.
AGENT_LIST_STATS_WINDOW = timedelta(hours=1)

CODE_OWNED_FIELDS = ["name", "version", "description", "registered", "input_schema_pretty", "topics"]
TUNABLE_FIELDS = [
    "tier",
    "sla_seconds",
    "soft_time_limit",
    "time_limit",
    "max_retries",
    "cache_ttl",
    "enabled",
    "backlog_limit",
    "concurrency_limit",
]


def pretty_json(value: Any) -> str | None:
    """Indented JSON in a <pre>, keys sorted (PostgreSQL's jsonb keeps no order worth showing)."""
    if value is None:
        return None
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def _leaf_messages(errors: dict | list | str) -> list[str]:
    """The messages of a RunRejected's nested field errors."""
    if isinstance(errors, dict):
        return [message for value in errors.values() for message in _leaf_messages(value)]
    if isinstance(errors, list):
        return [message for value in errors for message in _leaf_messages(value)]
    return [str(errors)]


def _refusal(exc: Exception) -> str:
    """Why the platform refused an operator's request, in a line (domain errors)."""
    if isinstance(exc, RunRejected):
        return " ".join(_leaf_messages(exc.errors))
    return str(exc)


def _failure(exc: Exception) -> str:
    """What went wrong, for a message: which service did not answer, never the error's details (they may
    name hosts or settings); those go to the log."""
    if isinstance(exc, redis.RedisError):
        return "Redis does not answer"
    if isinstance(exc, DatabaseError):
        return "the database did not take the change"
    return f"an unexpected error ({type(exc).__name__}); the web server's log has the details"


class AgentForm(forms.ModelForm):
    """The tunables, with Agent's check constraints reported on the field they concern.

    Left to the model, a violated constraint is a form-wide "Constraint … is violated";
    a field with an error here is excluded from that check, so each problem shows once.
    """

    class Meta:
        model = Agent
        fields = TUNABLE_FIELDS

    def clean_sla_seconds(self) -> float:
        return _positive(self.cleaned_data["sla_seconds"])

    def clean_soft_time_limit(self) -> float:
        return _positive(self.cleaned_data["soft_time_limit"])

    def clean_backlog_limit(self) -> int | None:
        return _at_least_one(self.cleaned_data["backlog_limit"], meaning="the tier's limit")

    def clean_concurrency_limit(self) -> int | None:
        return _at_least_one(self.cleaned_data["concurrency_limit"], meaning="no limit")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        soft, hard = cleaned.get("soft_time_limit"), cleaned.get("time_limit")
        if soft is not None and hard is not None and hard < soft:
            self.add_error("time_limit", f"Must not be below the soft time limit ({soft:g} s).")
        return cleaned


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValidationError("Must be more than 0 seconds.")
    return seconds


def _at_least_one(limit: int | None, *, meaning: str) -> int | None:
    # 0 would read as "no limit" in one place and "nothing" in another: an empty field says which.
    if limit is not None and limit < 1:
        raise ValidationError(f"Must be at least 1; leave it empty for {meaning}.")
    return limit


class AgentChangeList(ChangeList):
    """Gives each agent on the page its recent run figures (`agent.recent_stats`), from one grouped query."""

    def get_results(self, request) -> None:
        super().get_results(request)
        # Iterating fills the page queryset's cache, which the rows and the list_editable formset both read.
        agents = list(self.result_list)
        stats = agent_stats(
            runs=Run.objects.filter(agent__in=agents),
            window=AGENT_LIST_STATS_WINDOW,
            names=[agent.name for agent in agents],
        )
        for agent in agents:
            agent.recent_stats = stats[agent.name]


def _recent_stats(agent: Agent) -> StatsBlock:
    """The figures AgentChangeList attached, or (for an agent shown elsewhere) its own."""
    stats = getattr(agent, "recent_stats", None)
    if stats is None:
        stats = agent_stats(runs=agent.runs.all(), window=AGENT_LIST_STATS_WINDOW, names=[agent.name])[agent.name]
    return stats


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    """Agents come from code; operators change only the tunables."""

    form = AgentForm
    actions = ["clear_cache"]
    list_display = [
        "name",
        "version",
        "tier",
        "sla_seconds",
        "enabled",
        "registered",
        "cache_ttl",
        "max_retries",
        "soft_time_limit",
        "time_limit",
        "sla_compliance_recent",
        "p95_run_ms_recent",
    ]
    list_editable = ["tier", "sla_seconds", "enabled"]
    list_filter = ["tier", "enabled", "registered"]
    search_fields = ["name", "description"]
    fieldsets = [
        (None, {"fields": CODE_OWNED_FIELDS}),
        ("Tunables", {"fields": TUNABLE_FIELDS}),
        ("History", {"fields": ["created_at", "updated_at"], "classes": ["collapse"]}),
    ]
    readonly_fields = [*CODE_OWNED_FIELDS, "created_at", "updated_at"]

    def get_changelist_form(self, request, **kwargs):
        return super().get_changelist_form(request, form=AgentForm, **kwargs)

    def get_changelist(self, request, **kwargs) -> type[ChangeList]:
        return AgentChangeList

    @admin.display(description="SLA % (1h)")
    def sla_compliance_recent(self, agent: Agent) -> float | None:
        return _recent_stats(agent)["sla_compliance"]

    @admin.display(description="p95 run ms (1h)")
    def p95_run_ms_recent(self, agent: Agent) -> float | None:
        return _recent_stats(agent)["run_ms"]["p95"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="input schema")
    def input_schema_pretty(self, agent: Agent) -> str | None:
        return pretty_json(agent.input_schema)

    @admin.display(description="reacts to topics")
    def topics(self, agent: Agent) -> str:
        """Each topic the code subscribes the agent to, with the dispatcher's message counts."""
        spec = registry.get(agent.name)
        if spec is None or not spec.topics:
            return "-"
        try:
            stats = topic_stats()
        except redis.RedisError:
            return format_html_join("\n", "<div><code>{}</code> (counts unavailable: Redis does not answer)</div>", (
                (topic,) for topic in spec.topics))  # fmt: skip
        counters = ("received", "submitted", "bad", "refused")
        return format_html_join(
            "\n",
            "<div><code>{}</code>: {} received, {} runs submitted, {} bad, {} refused</div>",
            ((topic, *(stats.get(topic, {}).get(counter, 0) for counter in counters)) for topic in spec.topics),
        )

    @admin.action(description="Clear cached results", permissions=["change"])
    def clear_cache(self, request, queryset) -> None:
        try:
            removed = sum(result_cache_clear(agent.name) for agent in queryset)
        except Exception as exc:
            logger.exception("clearing cached results failed")
            self.message_user(request, f"Could not clear cached results: {_failure(exc)}.", level=messages.ERROR)
            return
        self.message_user(
            request, f"Removed {removed} cached result{pluralize(removed)} of {queryset.count()} agent(s)."
        )


RUN_FIELDSETS = [
    (None, {"fields": ["id", "agent", "agent_version", "tier", "status", "submitted_by", "idempotency_key"]}),
    ("Shared work", {"fields": ["parent_link", "follows_link", "cached"]}),
    ("Tree", {"fields": ["tree_picture"]}),
    ("Input and outcome", {"fields": ["input_pretty", "result_pretty", "error_pretty", "error_traceback"]}),
    ("Attempts", {"fields": ["attempts", "lost_attempts", "attempt_errors_pretty", "log_pretty"]}),
    ("Timing", {"fields": ["submitted_at", "started_at", "finished_at", "queue_wait_ms", "run_ms"]}),
    (
        "Promises",
        {"fields": ["sla_seconds", "deadline", "sla_met", "sla_miss", "soft_time_limit", "time_limit", "max_retries"]},
    ),
    ("Expiry and escalation", {"fields": ["expires_at", "escalate_at", "escalated_at"]}),
    ("Claim", {"fields": ["worker", "lease_expires_at"], "classes": ["collapse"]}),
]
# Fields the sections above show through a display method rather than as they are stored.
RUN_FIELDS_SHOWN_AS = {
    "input": "input_pretty",
    "result": "result_pretty",
    "error": "error_pretty",
    "attempt_errors": "attempt_errors_pretty",
    "log": "log_pretty",
    "parent": "parent_link",
    "follows": "follows_link",
}


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """The record of every run: read-only, except through cancel and run again (actions on the list,
    buttons on a run's page). The dashboard's pages live under it."""

    list_display = [
        "id",
        "agent",
        "tier",
        "status",
        "submitted_by",
        "submitted_at",
        "attempts",
        "queue_wait_ms",
        "run_ms",
        "sla_met",
    ]
    list_filter = ["status", "tier", "agent", "submitted_at"]
    list_select_related = ["agent", "submitted_by"]
    search_fields = ["=id"]
    search_help_text = "A run's full id."
    date_hierarchy = "submitted_at"
    ordering = ["-submitted_at"]
    show_full_result_count = False
    actions = ["cancel_runs", "run_again"]
    readonly_fields = [*RUN_FIELDS_SHOWN_AS.values(), "error_traceback", "tree_picture"]

    def get_fieldsets(self, request, obj=None):
        """The sections above, then any other field of the run under "More": the page shows every field."""
        shown = set(flatten_fieldsets(RUN_FIELDSETS))
        rest = [
            field.name
            for field in Run._meta.concrete_fields
            if field.name not in shown and RUN_FIELDS_SHOWN_AS.get(field.name) not in shown
        ]
        return [*RUN_FIELDSETS, ("More", {"fields": rest})] if rest else RUN_FIELDSETS

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path(
                "dashboard/",
                view(partial(dashboard.dashboard_page, admin_site=self.admin_site)),
                name="agents_dashboard",
            ),
            path("dashboard/data/", view(dashboard.dashboard_data), name="agents_dashboard_data"),
            path("dashboard/workers/", view(dashboard.dashboard_workers), name="agents_dashboard_workers"),
            path("<path:object_id>/cancel/", view(self.cancel_view), name="agents_run_cancel"),
            path("<path:object_id>/run-again/", view(self.run_again_view), name="agents_run_run_again"),
            *super().get_urls(),
        ]

    def get_search_results(self, request, queryset, search_term):
        """Find a run by its id; anything that is not a UUID finds nothing."""
        search_term = search_term.strip()
        if not search_term:
            return queryset, False
        try:
            run_id = uuid.UUID(search_term)
        except ValueError:
            return queryset.none(), False
        return queryset.filter(pk=run_id), False

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        # The change permission grants cancel and run again; a run's own fields stay read-only.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def changelist_view(self, request, extra_context=None):
        context = {"dashboard_url": reverse("admin:agents_dashboard"), "retention": retention_line()}
        return super().changelist_view(request, extra_context={**context, **(extra_context or {})})

    def change_view(self, request, object_id, form_url="", extra_context=None):
        run = self.get_object(request, object_id)
        buttons = {}
        if run is not None and self.has_change_permission(request):
            if not run.is_terminal:
                buttons["cancel"] = reverse("admin:agents_run_cancel", args=[run.pk])
            buttons["run_again"] = reverse("admin:agents_run_run_again", args=[run.pk])
        context = {**(extra_context or {}), "run_buttons": buttons}
        return super().change_view(request, object_id, form_url, extra_context=context)

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The run page's Cancel button."""

        def cancel(run: Run) -> None:
            run_cancel(run=run)
            self.message_user(request, f"Cancelled run {run.pk}.")

        return self._run_button(request, object_id, what="cancel", act=cancel)

    def run_again_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The run page's Run again button: a new run of the same agent, input and tier, shown at once."""
        submitted: list[Run] = []

        def run_again(run: Run) -> None:
            submitted.append(run_rerun(run=run, user=request.user))
            self.message_user(request, f"Submitted run {submitted[0].pk}, a new run of {run.pk}.")

        response = self._run_button(request, object_id, what="run again", act=run_again)
        if submitted:
            return HttpResponseRedirect(reverse("admin:agents_run_change", args=[submitted[0].pk]))
        return response

    def _run_button(
        self, request: HttpRequest, object_id: str, *, what: str, act: Callable[[Run], None]
    ) -> HttpResponse:
        """POST only, with the change permission; a refusal or a failure becomes a message on the run's page."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_change_permission(request):
            raise PermissionDenied
        run = self.get_object(request, object_id)
        if run is None:
            self.message_user(request, f"No run has the id {object_id!r}.", level=messages.ERROR)
            return HttpResponseRedirect(reverse("admin:agents_run_changelist"))
        try:
            act(run)
        except RunNotCancellable as exc:
            self.message_user(request, f"Run {run.pk} was not cancelled: {exc}.", level=messages.WARNING)
        except (RunRejected, AdmissionRefused) as exc:
            self.message_user(request, f"Could not {what} run {run.pk}: {_refusal(exc)}", level=messages.WARNING)
        except Exception as exc:
            logger.exception("%s of run %s failed", what, run.pk)
            self.message_user(request, f"Could not {what} run {run.pk}: {_failure(exc)}.", level=messages.ERROR)
        return HttpResponseRedirect(reverse("admin:agents_run_change", args=[run.pk]))

    @admin.display(description="input")
    def input_pretty(self, run: Run) -> str | None:
        return pretty_json(run.input)

    @admin.display(description="result")
    def result_pretty(self, run: Run) -> str | None:
        return pretty_json(run.result)

    @admin.display(description="error")
    def error_pretty(self, run: Run) -> str | None:
        if not run.error:
            return None
        return pretty_json({key: value for key, value in run.error.items() if key != "traceback"})

    @admin.display(description="traceback")
    def error_traceback(self, run: Run) -> str | None:
        traceback = (run.error or {}).get("traceback")
        return format_html("<pre>{}</pre>", traceback) if traceback else None

    @admin.display(description="runs below")
    def tree_picture(self, run: Run) -> str | None:
        """The run and every run below it, each coloured by status and linked (a DAG of steps for a workflow)."""
        return run_tree_picture(run, link=lambda run_id: reverse("admin:agents_run_change", args=[run_id]))

    @admin.display(description="errors of each attempt")
    def attempt_errors_pretty(self, run: Run) -> str | None:
        if not run.attempt_errors:
            return None
        rows = format_html_join(
            "\n",
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            (
                (
                    entry.get("attempt", ""),
                    entry.get("at", ""),
                    entry.get("type", ""),
                    entry.get("message", ""),
                    format_html("<details><summary>traceback</summary><pre>{}</pre></details>", entry["traceback"])
                    if entry.get("traceback")
                    else "-",
                )
                for entry in run.attempt_errors
            ),
        )
        return format_html(
            '<table class="attempt-errors"><thead><tr><th>attempt</th><th>at</th><th>type</th><th>message</th>'
            "<th></th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="log (ctx.logger)")
    def log_pretty(self, run: Run) -> str | None:
        return format_html('<pre class="run-log">{}</pre>', run.log) if run.log else None

    @admin.display(description="parent")
    def parent_link(self, run: Run) -> str | None:
        return _run_link(run.parent_id)

    @admin.display(description="follows")
    def follows_link(self, run: Run) -> str | None:
        return _run_link(run.follows_id)

    @admin.action(description="Cancel selected runs", permissions=["change"])
    def cancel_runs(self, request, queryset) -> None:
        cancelled = skipped = 0
        failed: list[str] = []
        for run in queryset:
            try:
                run_cancel(run=run)
            except RunNotCancellable:
                skipped += 1
            except Exception as exc:
                logger.exception("cancelling run %s failed", run.pk)
                failed.append(f"{run.pk} ({_failure(exc)})")
            else:
                cancelled += 1
        self.message_user(
            request,
            f"Cancelled {cancelled} run{pluralize(cancelled)}; skipped {skipped} that had already finished.",
        )
        if failed:
            self.message_user(request, f"Could not cancel {len(failed)}: {'; '.join(failed)}", level=messages.ERROR)

    @admin.action(description="Run again", permissions=["change"])
    def run_again(self, request, queryset) -> None:
        submitted, refused, failed = 0, [], []
        for run in queryset:
            try:
                run_rerun(run=run, user=request.user)
            except (RunRejected, AdmissionRefused) as exc:
                refused.append(f"{run.pk} ({_refusal(exc)})")
            except Exception as exc:
                logger.exception("running run %s again failed", run.pk)
                failed.append(f"{run.pk} ({_failure(exc)})")
            else:
                submitted += 1
        self.message_user(request, f"Submitted {submitted} new run{pluralize(submitted)}.")
        if refused:
            self.message_user(request, f"Refused {len(refused)}: {'; '.join(refused)}", level=messages.WARNING)
        if failed:
            self.message_user(request, f"Could not submit {len(failed)}: {'; '.join(failed)}", level=messages.ERROR)


def _run_link(run_id: uuid.UUID | None) -> str | None:
    if run_id is None:
        return None
    return format_html('<a href="{}">{}</a>', reverse("admin:agents_run_change", args=[run_id]), run_id)


def retention_line() -> str:
    """How long finished runs are kept, and the last purge noted (when, how many), in a sentence or two."""
    days = settings.RUN_RETENTION_DAYS
    if days <= 0:
        return "Finished runs are kept forever (RUN_RETENTION_DAYS is 0)."
    line = f"Finished runs are deleted {days} day{pluralize(days)} after they finished."
    last = retention_last_purge()
    if last is None:
        return f"{line} No purge has been noted yet."
    more = "" if last["complete"] else "; more are left for the next pass"
    return f"{line} Last purge: {last['at'][:19].replace('T', ' ')} UTC, {last['deleted']} deleted{more}."


SCHEDULE_FIELDS = ["name", "agent", "input", "tier", "owner", "enabled"]
SCHEDULE_TIMING_FIELDS = ["cron", "interval_seconds"]


class RunScheduleForm(forms.ModelForm):
    """A schedule, with the services' checks reported on the field they concern."""

    class Meta:
        model = RunSchedule
        fields = [*SCHEDULE_FIELDS, *SCHEDULE_TIMING_FIELDS]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Left empty, the operator who saves the schedule owns it (RunScheduleAdmin.save_model).
        self.fields["owner"].required = False

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        errors = schedule_errors(
            agent=cleaned.get("agent"),
            input=cleaned.get("input"),
            tier=cleaned.get("tier"),
            cron=cleaned.get("cron") or "",
            interval_seconds=cleaned.get("interval_seconds"),
            enabled=bool(cleaned.get("enabled")),
        )
        already = set(self._errors)
        if already & set(SCHEDULE_TIMING_FIELDS):
            # A malformed interval reads as a missing one; its own error says enough.
            errors = {field: value for field, value in errors.items() if field not in SCHEDULE_TIMING_FIELDS}
        for field, field_messages in errors.items():
            if field not in already:
                self.add_error(field, field_messages)
        return cleaned


@admin.register(RunSchedule)
class RunScheduleAdmin(admin.ModelAdmin):
    """Agent runs on a cron expression or an interval; every firing submits a normal run for the owner."""

    form = RunScheduleForm
    list_display = ["name", "agent", "run_tier", "timing", "enabled", "last_run_link", "owner"]
    list_filter = ["enabled", "agent"]
    list_select_related = ["agent", "owner", "last_run"]
    search_fields = ["name"]
    raw_id_fields = ["owner"]
    fieldsets = [
        (None, {"fields": SCHEDULE_FIELDS}),
        ("When", {"fields": SCHEDULE_TIMING_FIELDS, "description": "A cron expression or an interval, not both."}),
        ("History", {"fields": ["last_run_link", "periodic_task_link", "created_at", "updated_at"]}),
    ]
    readonly_fields = ["last_run_link", "periodic_task_link", "created_at", "updated_at"]

    def get_changeform_initial_data(self, request) -> dict[str, Any]:
        return {"owner": request.user.pk, **super().get_changeform_initial_data(request)}

    def save_model(self, request, obj: RunSchedule, form, change: bool) -> None:
        if obj.owner_id is None:
            obj.owner = request.user
        schedule_save(schedule=obj)

    def delete_model(self, request, obj: RunSchedule) -> None:
        schedule_delete(schedule=obj)

    def delete_queryset(self, request, queryset) -> None:
        for schedule in queryset:
            schedule_delete(schedule=schedule)

    @admin.display(description="tier")
    def run_tier(self, schedule: RunSchedule) -> str:
        return schedule.get_tier_display() if schedule.tier else f"{schedule.agent.get_tier_display()} (agent's)"

    @admin.display(description="cron / interval")
    def timing(self, schedule: RunSchedule) -> str:
        return schedule.cron or f"every {schedule.interval_seconds} s"

    @admin.display(description="last run")
    def last_run_link(self, schedule: RunSchedule) -> str | None:
        run = schedule.last_run
        if run is None:
            return None
        url = reverse("admin:agents_run_change", args=[run.pk])
        return format_html('<a href="{}">{}</a> ({})', url, run.submitted_at.strftime("%Y-%m-%d %H:%M:%S"), run.status)

    @admin.display(description="periodic task")
    def periodic_task_link(self, schedule: RunSchedule) -> str | None:
        task = schedule.periodic_task
        if task is None:
            return None
        try:
            url = reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])
        except NoReverseMatch:
            return str(task)
        return format_html('<a href="{}">{}</a>', url, task)
