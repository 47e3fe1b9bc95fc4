"""Run the built-in multi-agent pipeline on a corpus and print its report, with what each step cost."""

import json
import time
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from agents.errors import RunRejected
from agents.models import Run
from agents.runs.submit import RunRequest, run_submit

SAMPLE = Path(__file__).resolve().parents[2] / "builtin" / "data" / "sample_corpus.txt"
POLL_SECONDS = 0.2


class Command(BaseCommand):
    help = (
        "Split a corpus into documents (separated by a line of ---), analyse each in parallel with text_stats, "
        "aggregate one report, and print it with how many steps were computed, cached and coalesced. "
        "Needs the platform's workers running (make up)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", nargs="?", default=str(SAMPLE), help="the corpus (default: a sample corpus)")
        parser.add_argument("--user", default=None, help="who submits it (default: the first staff user)")
        parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the report")

    def handle(self, *args, file: str, user: str | None, timeout: float, **options) -> None:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read the corpus {file}: {exc.strerror}") from exc
        users = get_user_model().objects
        owner = users.filter(username=user).first() if user else users.filter(is_staff=True).order_by("pk").first()
        if owner is None:
            raise CommandError(f"no user {user!r}" if user else "no staff user: run `manage.py ensure_admin` first")
        try:
            run, _ = run_submit(user=owner, request=RunRequest(agent="corpus.report", input={"text": text}))
        except RunRejected as exc:
            raise CommandError(f"the corpus was refused: {json.dumps(exc.errors)}") from exc
        self.stderr.write(f"run {run.pk} submitted; waiting for its report")
        deadline = time.monotonic() + timeout
        while not run.is_terminal:
            if time.monotonic() > deadline:
                raise CommandError(f"no report within {timeout:g}s (run {run.pk} is {run.status}): are workers up?")
            time.sleep(POLL_SECONDS)
            run.refresh_from_db()
        if run.status != "succeeded":
            raise CommandError(f"run {run.pk} ended {run.status}: {(run.error or {}).get('message', '')}")
        steps = run.result["steps"]
        tree = Run.objects.filter(root=run.pk).count()
        self.stdout.write(json.dumps(run.result["outputs"]["report"], indent=2))
        self.stdout.write(
            f"{tree + 1} runs in the tree; steps computed: {steps['computed']}, "
            f"from the cache: {steps['cached']}, coalesced: {steps['coalesced']}"
        )
