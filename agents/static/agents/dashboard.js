/* The admin's dashboard: polls the figures and the workers online, and draws them with Chart.js.
 *
 * window.dashboardCharts holds the charts by canvas id; window.dashboardReady turns true once every
 * chart has been drawn from the first answer. */
(function () {
    "use strict";

    const TIERS = ["critical", "standard", "batch"];
    const COLORS = {critical: "#e8590c", standard: "#1c7ed6", batch: "#2f9e44"};
    const SHARING = {executed: "#495057", cached: "#f59f00", coalesced: "#7048e8"};
    const QUEUES = [...TIERS, "housekeeping", "other"];

    const root = document.getElementById("dashboard");
    const statusLine = document.getElementById("dashboard-status");
    // Until the first answer says how often to ask again (each window has its own pace).
    let pollMs = 5000;
    const workersPollMs = Number(root.dataset.workersPollSeconds) * 1000;
    let windowName = root.dataset.window;
    let dataTimer = null;
    const charts = {};
    window.dashboardCharts = charts;
    window.dashboardReady = false;

    const bodyStyle = getComputedStyle(document.body);
    Chart.defaults.color = bodyStyle.getPropertyValue("--body-quiet-color").trim() || "#666";
    Chart.defaults.borderColor = bodyStyle.getPropertyValue("--hairline-color").trim() || "#e8e8e8";

    function number(value, digits) {
        if (value === null || value === undefined) {
            return "–";
        }
        return Number(value).toLocaleString(undefined, {maximumFractionDigits: digits === undefined ? 1 : digits});
    }

    function percentiles(figures) {
        return [figures.p50, figures.p95, figures.p99].map((value) => number(value, 0)).join(" / ");
    }

    function cell(row, text, isNumber) {
        const td = document.createElement("td");
        td.textContent = text;
        if (isNumber) {
            td.className = "number";
        }
        row.appendChild(td);
        return td;
    }

    function fill(tbody, rows) {
        tbody.replaceChildren(...rows);
    }

    function tierDataset(tier, extra) {
        return Object.assign({
            label: tier,
            data: [],
            borderColor: COLORS[tier],
            backgroundColor: COLORS[tier] + "99",
            borderWidth: 2,
            pointRadius: 0,
            spanGaps: true,
            tension: 0.2,
        }, extra || {});
    }

    function chart(id, type, datasets, scales) {
        charts[id] = new Chart(document.getElementById(id), {
            type: type,
            data: {labels: [], datasets: datasets},
            options: {
                animation: false,
                responsive: true,
                maintainAspectRatio: false,
                interaction: {mode: "index", intersect: false},
                plugins: {legend: {position: "bottom"}},
                scales: Object.assign({y: {beginAtZero: true}}, scales || {}),
            },
        });
    }

    chart("chart-throughput", "line", TIERS.map((tier) => tierDataset(tier)));
    chart("chart-now", "bar", [
        {label: "backlog", data: [], backgroundColor: "#868e96"},
        {label: "running", data: [], backgroundColor: "#1c7ed6"},
    ]);
    chart("chart-queue-wait", "line", TIERS.map((tier) => tierDataset(tier)));
    chart("chart-run-time", "line", TIERS.map((tier) => tierDataset(tier)));
    chart("chart-sla", "line", TIERS.map((tier) => tierDataset(tier)), {y: {beginAtZero: true, max: 100}});
    chart("chart-refusals", "bar", TIERS.map((tier) => tierDataset(tier, {borderWidth: 0})), {
        x: {stacked: true},
        y: {stacked: true, beginAtZero: true},
    });
    chart("chart-sharing", "bar", Object.keys(SHARING).map((kind) => ({
        label: kind,
        data: [],
        backgroundColor: SHARING[kind],
    })), {x: {stacked: true}, y: {stacked: true, beginAtZero: true}});

    function timeLabels(starts, bucketSeconds) {
        return starts.map((start) => {
            const at = new Date(start);
            const options = {hour: "2-digit", minute: "2-digit"};
            if (bucketSeconds < 60) {
                options.second = "2-digit";
            }
            return at.toLocaleTimeString([], options);
        });
    }

    function draw(id, labels, datasets) {
        const target = charts[id];
        target.data.labels = labels;
        datasets.forEach((data, index) => {
            target.data.datasets[index].data = data;
        });
        target.update("none");
    }

    function renderTiers(snapshot) {
        const rows = TIERS.map((tier) => {
            const block = snapshot.tiers[tier];
            const row = document.createElement("tr");
            const name = document.createElement("th");
            name.scope = "row";
            name.textContent = tier;
            row.appendChild(name);
            cell(row, number(block.backlog, 0), true);
            cell(row, number(block.running_now, 0), true);
            cell(row, number(block.finished_per_minute, 2), true);
            cell(row, percentiles(block.queue_wait_ms), true);
            cell(row, percentiles(block.run_ms), true);
            cell(row, number(block.sla_compliance, 2), true);
            cell(row, number(block.admission_refusals, 0), true);
            cell(row, [block.executed, block.cached, block.coalesced].map((n) => number(n, 0)).join(" / "), true);
            cell(row, number(block.cache_hit_rate, 1), true);
            return row;
        });
        fill(document.querySelector("#dashboard-tiers tbody"), rows);
    }

    function renderCache(snapshot) {
        const cache = snapshot.cache;
        const memo = cache.memo;
        const lines = [
            ["result-cache hit rate (window)", cache.hit_rate === null ? "–" : number(cache.hit_rate, 1) + " %"],
            ["answered from the result cache", number(cache.cached, 0)],
            ["coalesced (followed an identical run)", number(cache.coalesced, 0)],
            ["executed", number(cache.executed, 0)],
        ];
        if (memo) {
            lines.push(
                ["memoized time saved (all time)", number(memo.saved_ms / 1000, 3) + " s"],
                ["memoized hit rate (all time)", memo.hit_rate === null ? "–" : number(memo.hit_rate, 1) + " %"],
                ["memoized functions", number(memo.functions, 0)],
            );
        } else {
            lines.push(["memoized functions", "Redis does not answer"]);
        }
        fill(document.querySelector("#dashboard-cache tbody"), lines.map(([label, value]) => {
            const row = document.createElement("tr");
            const th = document.createElement("th");
            th.scope = "row";
            th.textContent = label;
            row.appendChild(th);
            cell(row, value, true);
            return row;
        }));
    }

    function renderRetention(snapshot) {
        const retention = snapshot.retention;
        const target = document.getElementById("dashboard-retention");
        if (retention.days <= 0) {
            target.textContent = "Finished runs are kept forever (RUN_RETENTION_DAYS is 0).";
            return;
        }
        let text = `Finished runs are deleted ${retention.days} day(s) after they finished.`;
        const last = retention.last_purge;
        if (last) {
            text += ` Last purge: ${new Date(last.at).toLocaleString()}, ${number(last.deleted, 0)} deleted`;
            text += last.complete ? "." : "; more are left for the next pass.";
        } else {
            text += " No purge has been noted yet.";
        }
        target.textContent = text;
    }

    function render(snapshot) {
        const series = snapshot.series;
        const labels = timeLabels(series.starts, snapshot.bucket_seconds);
        const perTier = (pick) => TIERS.map((tier) => pick(series.tiers[tier]));
        draw("chart-throughput", labels, perTier((figures) => figures.finished_per_minute));
        draw("chart-queue-wait", labels, perTier((figures) => figures.queue_wait_ms.p95));
        draw("chart-run-time", labels, perTier((figures) => figures.run_ms.p95));
        draw("chart-sla", labels, perTier((figures) => figures.sla_compliance));
        draw("chart-refusals", labels, perTier((figures) => figures.admission_refusals));
        draw("chart-sharing", labels, Object.keys(SHARING).map((kind) => labels.map(
            (_, index) => TIERS.reduce((sum, tier) => sum + series.tiers[tier][kind][index], 0),
        )));
        draw("chart-now", TIERS, [
            TIERS.map((tier) => snapshot.tiers[tier].backlog),
            TIERS.map((tier) => snapshot.tiers[tier].running_now),
        ]);
        renderTiers(snapshot);
        renderCache(snapshot);
        renderRetention(snapshot);
        const note = snapshot.redis_answers ? "" : " (Redis does not answer: refusals and memo figures missing)";
        statusLine.textContent = `Updated ${new Date(snapshot.generated_at).toLocaleTimeString()}${note}`;
        statusLine.classList.toggle("error", !snapshot.redis_answers);
        window.dashboardReady = true;
    }

    async function getJSON(url) {
        const response = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
        if (!response.ok) {
            let detail = `HTTP ${response.status}`;
            try {
                const body = await response.json();
                detail = body.detail || Object.values(body).flat().join(" ") || detail;
            } catch (ignored) {
                // Not JSON (a login page after the session ended, a proxy's error page): the status says enough.
            }
            throw new Error(detail);
        }
        return response.json();
    }

    async function refresh() {
        clearTimeout(dataTimer);
        const asked = windowName;
        try {
            const snapshot = await getJSON(`${root.dataset.dataUrl}?window=${encodeURIComponent(asked)}`);
            if (asked === windowName) {
                render(snapshot);
                pollMs = snapshot.poll_seconds * 1000;
            }
        } catch (error) {
            statusLine.textContent = `Could not refresh: ${error.message}`;
            statusLine.classList.add("error");
        }
        dataTimer = setTimeout(refresh, pollMs);
    }

    async function refreshWorkers() {
        const tbody = document.querySelector("#dashboard-workers tbody");
        try {
            const answer = await getJSON(root.dataset.workersUrl);
            fill(tbody, QUEUES.filter((queue) => queue !== "other" || answer.queues.other.length).map((queue) => {
                const workers = answer.queues[queue] || [];
                const row = document.createElement("tr");
                const th = document.createElement("th");
                th.scope = "row";
                th.textContent = queue;
                row.appendChild(th);
                cell(row, workers.length ? workers.map((worker) => worker.name).join(", ") : "none answered");
                cell(row, number(workers.reduce((sum, worker) => sum + (worker.pool || 0), 0), 0), true);
                return row;
            }));
        } catch (error) {
            const row = document.createElement("tr");
            cell(row, `Could not ask the workers: ${error.message}`).colSpan = 3;
            fill(tbody, [row]);
        }
        setTimeout(refreshWorkers, workersPollMs);
    }

    root.querySelectorAll(".dashboard-window").forEach((button) => {
        button.addEventListener("click", () => {
            windowName = button.dataset.window;
            root.querySelectorAll(".dashboard-window").forEach((other) => {
                other.classList.toggle("selected", other === button);
            });
            const url = new URL(window.location.href);
            url.searchParams.set("window", windowName);
            window.history.replaceState(null, "", url);
            refresh();
        });
    });

    refresh();
    refreshWorkers();
}());
