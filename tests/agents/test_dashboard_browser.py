"""The dashboard in a real browser: headless Chromium (Debian's, installed when missing) logs into the
admin, opens the dashboard with runs recorded, and every chart draws data without a console error.

Chromium is driven over its DevTools protocol on one WebSocket (the `websockets` package the ASGI
server already brings), so the test needs no driver binary. Host names other than the live server's
resolve to nothing, so the browser reaches no address but loopback.
"""

import base64
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone
from websockets.sync.client import ClientConnection, connect

from agents.models import Agent, RunStatus
from agents.stats import admission_refusals_record
from scheduling.tiers import Tier
from tests.debian import INSTALL_SECONDS, debian_program
from tests.factories import RunFactory, StaffFactory
from tests.polling import eventually

BROWSER_START_SECONDS = 60
DASHBOARD_READY_SECONDS = 60
PASSWORD = "secret-password"  # StaffFactory's


def chromium() -> str:
    """Debian's chromium, installed with apt-get when it is missing."""
    return debian_program("chromium", "chromium", "fonts-dejavu-core")


class DevTools:
    """One page of a browser, driven over the Chrome DevTools protocol; events are kept as they arrive."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self.last_id = 0

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if message.get("id") != self.last_id:
                self.events.append(message)
                continue
            assert "error" not in message, f"{method}: {message['error']}"
            return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    def open(self, url: str, *, seconds: float = 30) -> None:
        """Go to `url` and wait until the page has loaded."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_loaded(seconds=seconds)

    def wait_loaded(self, *, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not any(event.get("method") == "Page.loadEventFired" for event in self.events):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the page did not load"
            self.events.append(json.loads(self.socket.recv(timeout=remaining)))

    def console_errors(self) -> list[str]:
        """Errors the page shown now reported: console.error calls, uncaught exceptions, failed loads."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Page.frameNavigated" and "parentId" not in params["frame"]:
                errors = []  # a new page: what the one before reported was about that one
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("exception", {}).get("description", "an exception"))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        return errors


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    binary = chromium()
    profile = tmp_path / "profile"
    log = tmp_path / "chromium.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # as root, Chromium's sandbox refuses to start
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-sync",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--no-pings",
                # Nothing but the live server (loopback) resolves: the browser talks to no one else.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1400,2400",
                "about:blank",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        port_file = profile / "DevToolsActivePort"
        eventually(
            lambda: (port_file.exists() and port_file.read_text().strip()) or process.poll() is not None,
            seconds=BROWSER_START_SECONDS,
            what="chromium's DevTools port",
            every=0.2,
        )
        assert process.poll() is None, f"chromium stopped:\n{log.read_text()[-3000:]}"
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(target for target in json.load(answer) if target["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as socket:
            tools = DevTools(socket)
            for domain in ("Page", "Runtime", "Log"):
                tools.call(f"{domain}.enable")
            yield tools
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def runs_recorded() -> None:
    """A recent hour of each tier: executed runs, cached and coalesced ones, a backlog, refusals."""
    now = timezone.now()
    agents = {Tier.CRITICAL: "echo", Tier.STANDARD: "echo", Tier.BATCH: "factorize"}
    for index, (tier, name) in enumerate(agents.items()):
        agent = Agent.objects.get(name=name)
        leader = None
        for minutes in range(2, 50, 2 + 2 * index):
            submitted = now - timedelta(minutes=minutes, seconds=index)
            leader = RunFactory(
                agent=agent,
                tier=tier,
                finished=True,
                submitted_at=submitted,
                queue_wait_ms=20 * (index + 1) + minutes,
                run_ms=100 * (index + 1) + 7 * minutes,
                sla_met=minutes % 12 != 2,
            )
        for minutes in (5, 25):
            RunFactory(
                agent=agent, tier=tier, status=RunStatus.SUCCEEDED, cached=True, sla_met=True,
                submitted_at=now - timedelta(minutes=minutes), finished_at=now - timedelta(minutes=minutes),
            )  # fmt: skip
        RunFactory(
            agent=agent, tier=tier, status=RunStatus.SUCCEEDED, follows=leader, sla_met=True,
            submitted_at=now - timedelta(minutes=3), finished_at=now - timedelta(minutes=1),
        )  # fmt: skip
        RunFactory.create_batch(index + 2, agent=agent, tier=tier, status=RunStatus.QUEUED)
        RunFactory(agent=agent, tier=tier, status=RunStatus.RUNNING, started_at=now)
        admission_refusals_record({tier.value: 3 + index}, at=now - timedelta(minutes=index + 1))


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_SECONDS + 300)
def test_the_dashboard_draws_every_chart_in_a_real_browser_without_console_errors(browser, live_server, tmp_path):
    staff = StaffFactory()
    runs_recorded()
    dashboard = reverse("admin:agents_dashboard")

    browser.open(f"{live_server.url}{reverse('admin:login')}?next={dashboard}")
    browser.events.clear()
    browser.evaluate(
        f"""document.getElementById("id_username").value = {json.dumps(staff.username)};
        document.getElementById("id_password").value = {json.dumps(PASSWORD)};
        document.getElementById("login-form").submit();"""
    )
    browser.wait_loaded()
    assert browser.evaluate("window.location.pathname") == dashboard
    eventually(
        lambda: browser.evaluate("window.dashboardReady === true"),
        seconds=DASHBOARD_READY_SECONDS,
        what="the dashboard's first drawing",
        every=0.2,
    )
    charts = browser.evaluate(
        """Object.entries(window.dashboardCharts).map(([id, chart]) => ({
            id: id,
            drawn: chart.chartArea !== undefined && chart.canvas.width > 0 && chart.canvas.height > 0,
            points: chart.data.datasets.map((set) => set.data.filter((v) => v !== null && v > 0).length),
        }))"""
    )
    tier_rows = browser.evaluate('document.querySelectorAll("#dashboard-tiers tbody tr").length')
    # Let the workers' answer (a broadcast nobody answers here) arrive, then picture the page.
    eventually(
        lambda: "Asking" not in browser.evaluate('document.querySelector("#dashboard-workers").textContent'),
        seconds=15,
        what="the workers' table",
    )
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    screenshot = tmp_path / "dashboard.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    print(f"dashboard screenshot: {screenshot}")

    assert {chart["id"] for chart in charts} == {
        "chart-throughput", "chart-now", "chart-queue-wait", "chart-run-time", "chart-sla", "chart-refusals",
        "chart-sharing",
    }  # fmt: skip
    for chart in charts:
        assert chart["drawn"], f"{chart['id']} was not drawn"
        assert sum(chart["points"]) > 0, f"{chart['id']} has no data: {chart['points']}"
    assert tier_rows == 3
    assert browser.console_errors() == []
    assert screenshot.stat().st_size > 10_000
