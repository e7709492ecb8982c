"""report.html: self-contained, says what is missing, and its explorer works in a real browser (headless Chromium)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_plots import CONTEXTS, make_run

from steerstrength.plots import draw_all, token_label
from steerstrength.run_tables import RunTables
from steerstrength.report import EXPLORER_SHOW, P_SCALE, explorer_data, write_report

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and os.path.isfile(p)), None)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("report") / "run", concepts=("joy",), layers=(3, 5), n_alphas=40)
    draw_all(run)
    return write_report(run)


def test_the_page_is_self_contained(full_report):
    page = full_report.read_text()
    run = full_report.parent
    index = json.loads((run / "figures" / "index.json").read_text())
    assert 'http-equiv="Content-Security-Policy" content="default-src &#x27;none&#x27;' in page
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)", page)  # nothing loaded from anywhere but the page
    assert not re.search(r"<link|@import|url\(|https?://", page)
    assert page.count('src="data:image/png;base64,') == len(index["figures"]) == 9
    assert not list(run.glob(".report.html.*"))  # the atomic write left no temp file


def test_the_page_holds_config_stages_and_findings(full_report):
    page = full_report.read_text()
    run = full_report.parent
    from steerstrength.config import tomllib  # tomllib, or tomli before Python 3.11

    n_alphas = tomllib.loads((run / "config.toml").read_text())["tokens"]["n_alphas"]
    assert "[tokens]" in page and f"n_alphas = {n_alphas}" in page  # config.toml, as the run wrote it
    for stage in ("prompts", "vectors", "tokens", "xent", "concept", "mmlu", "recommend"):
        assert f"<td>{stage}</td>" in page
    xent = json.loads((run / "tables" / "xent.json").read_text())["per_vector"]
    assert f"<td>{xent['joy/5']['curvature']['jvp']:.3g}</td>" in page  # the measured curvature
    assert "Thm 3.8 <span class=\"badge ok\"" in page  # positive curvature: agrees
    assert "Prop. 4.1: <span class=\"badge ok\"" in page  # the synthetic TV shrinks on both sides
    assert "Not available" not in page
    assert "prompt 1" in page and "sweet-spot" in page  # the recommend table


def test_missing_stages_say_not_available_with_the_reason(tmp_path):
    run = make_run(tmp_path / "part", layers=(3,), stages=("tokens",), resamples=0,
                   skipped={"mmlu": "no MMLU data: set mmlu.source", "xent": "disabled (xent.enabled=false)"},
                   failed=("concept",))
    page = write_report(run).read_text()  # before any figure was drawn
    assert "Not available: no figures drawn yet" in page
    assert "Not available: the mmlu stage was skipped: no MMLU data: set mmlu.source." in page
    assert "Not available: the xent stage was skipped: disabled (xent.enabled=false)." in page
    assert "Not available: the concept stage did not finish" in page
    assert "Not available: the recommend stage has not run." in page
    assert 'id="explorer-data"' in page  # the tokens stage ran, so the explorer is there


def test_explorer_data_are_the_table_probabilities(tmp_path):
    run = make_run(tmp_path / "ex", layers=(3,), stages=("tokens", "logodds"), n_alphas=200)
    data = explorer_data(RunTables(run))["concepts"]["joy"]["3"]
    table = pd.read_parquet(run / "tables" / "tokens.parquet")
    grid = np.sort(table["alpha"].unique())
    assert len(data["alphas"]) <= 62 and 0.0 in data["alphas"] and data["alphas"][data["zero"]] == 0.0
    assert data["alphas"][0] == grid[0] and data["alphas"][-1] == grid[-1]
    for ctx, c in zip(CONTEXTS, data["contexts"]):
        assert c["id"] == ctx["id"]
        mine = table[table["context_id"] == ctx["id"]]
        for i, alpha in enumerate(data["alphas"]):
            at = mine[mine["alpha"] == alpha].sort_values(["p", "token_id"], ascending=[False, True])
            want = [token_label(t, 40) for t in at["token"].head(EXPLORER_SHOW)]
            shown = sorted(range(len(c["tokens"])), key=lambda j: (-c["p"][i][j], j))[:EXPLORER_SHOW]
            assert set(want[:5]) <= {c["tokens"][j] for j in shown}  # the leaders, up to ties after rounding
            for j in shown:
                row = at[at["token"].map(lambda t: token_label(t, 40)) == c["tokens"][j]]
                assert c["p"][i][j] == round(float(row["p"].iloc[0]) * P_SCALE)
            assert c["tracked"][i] == round(float(at["p"].sum()) * P_SCALE)
        assert any(c["target"]) and not all(c["target"])


# ----------------------------------------------------------------------------- the browser


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no dependency beyond the binary."""

    def __init__(self, binary: str, profile: Path):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def wire():  # in the child: its ends of the pipes on fds 3 (commands in) and 4 (replies out)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-default-apps", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id, self.events = b"", 0, []

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed the pipe: " + self.proc.stderr.read().decode(errors="replace")[-2000:])
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._receive(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, EOFError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (make test installs it: apt-get install -y chromium)")
def test_the_explorer_works_in_chromium_without_console_errors(full_report, tmp_path):
    browser = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable", session=session)
        url = full_report.resolve().as_uri()
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")

        def js(expression: str):
            result = browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                  session=session)
            assert "exceptionDetails" not in result, result
            return result["result"].get("value")

        bars = "Array.from(document.querySelectorAll('#ex-bars .bar-row')).map(r => r.textContent)"
        first = js(bars)
        assert len(first) == EXPLORER_SHOW and js("document.getElementById('ex-alpha-value').textContent") == "0.0"
        js("(() => { const s = document.getElementById('ex-alpha'); s.value = s.max;"
           " s.dispatchEvent(new Event('input', {bubbles: true})); })()")
        moved = js(bars)
        assert moved != first  # moving the slider changes the displayed distribution
        assert js("document.getElementById('ex-alpha-value').textContent") == "+200"

        # The first bar is the table's most probable token at alpha_max, in the selected context and layer.
        table = pd.read_parquet(full_report.parent / "tables" / "tokens.parquet")
        layer = int(js("document.getElementById('ex-layer').value"))
        context = js("document.getElementById('ex-context').selectedOptions[0].textContent").split(" ")[0]
        at = table[(table["layer"] == layer) & (table["context_id"] == context) & (table["alpha"] == 200.0)]
        best = at.sort_values("p", ascending=False).iloc[0]
        assert moved[0].startswith(token_label(best["token"], 40))
        assert f"{100 * round(best['p'] * P_SCALE) / P_SCALE:.2f}%" in moved[0]

        js("(() => { const l = document.getElementById('ex-layer'); l.value = '5';"
           " l.dispatchEvent(new Event('change')); })()")
        assert js(bars) != moved  # another layer, another distribution

        errors = [e for e in browser.events if
                  (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")) or
                  e.get("method") == "Runtime.exceptionThrown" or
                  (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert errors == []
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
        assert requests and all(u == url or u.startswith("data:") for u in requests), requests
    finally:
        browser.close()


def test_the_mmlu_rule_is_not_judged_when_the_unsteered_model_is_not_above_chance():
    from steerstrength.report import findings_mmlu

    def run_with(correct_at_zero: float, low: float):
        acc = dict(alpha=[-1.0, 0.0, 1.0], accuracy=[0.3, correct_at_zero, 0.3], ci_low=[0.1, low, 0.1],
                   ci_high=[0.6, 0.9, 0.6])
        summary = {"source": "mmlu", "per_vector": {"joy/28": dict(accuracy=acc, random_guess=0.25, n_questions=12,
                                                                      k_shots=2)}}
        return type("Run", (), {"summary": lambda self, name: summary})()

    at_chance = findings_mmlu(run_with(0.0, 0.0))
    assert "unclear" in at_chance and "Not judged" in at_chance and "disagrees" not in at_chance
    skilled = findings_mmlu(run_with(0.8, 0.5))  # above chance: the rule decides (both ends below 0.8)
    assert "agrees" in skilled and "Not judged" not in skilled


def test_a_concept_curve_with_too_few_fluent_alphas_is_unclear_with_the_reason():
    """Gemma-3-270M at layer 14 (demo grid, 9 alphas in +/-1 r_l): text degenerates past 0.25 r_l, leaving 4 fluent
    alphas; a 4-parameter tanh fits them exactly, so the badge must not read that as agreement."""
    from steerstrength.metrics.concept import fit_tanh
    from steerstrength.verdicts import rule_concept, rule_concept_text

    alphas = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]
    p = [0.0, 0.0, 0.0, 0.0, 0.0, 0.12, 0.12, 0.08, 0.0]
    inside = [(a, q) for a, q in zip(alphas, p) if -0.5 <= a <= 0.25]
    cur = dict(alpha=alphas, p=p, spearman_rho=0.51, tanh_fit=fit_tanh(alphas, p), fit_range=[-0.5, 0.25],
               degenerate_alphas=[-1.0, -0.75, 0.5, 0.75, 1.0], spearman_rho_nondegenerate=0.77,
               tanh_fit_nondegenerate=fit_tanh(*zip(*inside)))
    assert rule_concept(cur) is None
    text = rule_concept_text(cur)
    assert "holds 4 grid points" in text and "concept.alpha_max" in text
