"""`steerstrength serve`: the live steering page. Its API through aiohttp's test client (answers, and bad requests
answered with an error while the server keeps serving), and the page itself in headless Chromium."""

import asyncio
import json
import socket
import threading
import time

import pandas as pd
import pytest
import torch

from steerstrength import difference_of_means
from steerstrength.config import USE
from steerstrength.serve import MAX_BODY, make_app, steerable
from steerstrength.steering import next_token_probs
from cliutil import error_lines, run_cli
from test_strength import make_run
from tiny import tiny_model

P = ["i am so happy and glad today", "joy and a smile , i laugh", "you are my friend and i love you"]
N = ["the table is in the kitchen", "a cat saw a dog in the house", "rain in the evening"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    """A run directory with vectors, a recommendation, a fluent range and a concept curve with two controls."""
    root = make_run(tmp_path_factory.mktemp("serve") / "run")
    (root / "vectors").mkdir()
    difference_of_means(model, P, N, [1, 2], concept="joy").save(root / "vectors" / "joy.safetensors")
    alphas = [-2.0, 0.0, 2.0]
    rows = [dict(concept="joy", layer=2, scope="pooled", judge="probe", alpha=a, p=p, direction=d)
            for d, ps in (("v", [0.1, 0.2, 0.7]), ("random-0", [0.15, 0.2, 0.25]), ("random-1", [0.1, 0.2, 0.3]))
            for a, p in zip(alphas, ps)]
    pd.DataFrame(rows).to_parquet(root / "tables" / "concept_curve.parquet")
    return root


@pytest.fixture(scope="module")
def steer_set(model, run_dir):
    return steerable(model, [run_dir / "vectors" / "joy.safetensors"], run_dir)


def call(steer_set, requests):
    """[(status, JSON)] of each (method, path, body) against the app, in order, through aiohttp's test client."""
    from aiohttp.test_utils import TestClient, TestServer

    async def go():
        out = []
        async with TestClient(TestServer(make_app(steer_set), host="127.0.0.1")) as client:
            for method, path, body in requests:
                kwargs = {} if body is None else {"data": body if isinstance(body, (bytes, str)) else json.dumps(body)}
                r = await client.request(method, path, **kwargs)
                out.append((r.status, await (r.json() if path.startswith("/api") else r.text()), dict(r.headers)))
        return out

    return asyncio.run(go())


def test_info_carries_the_run_s_strength_in_residual_units(steer_set):
    (status, info, _), = call(steer_set, [("GET", "/api/info", None)])
    assert status == 200 and [v["id"] for v in info["vectors"]] == ["joy/1", "joy/2"]
    v = info["vectors"][1]
    scale = v["resid_scale"]
    assert [(r["method"], r["alpha_resid"]) for r in v["recommended"]] == [("sweet-spot", pytest.approx(3 * scale)),
                                                                          ("iso-kl", pytest.approx(2 * scale))]
    assert v["fluent_range"] == pytest.approx([-1.5 * scale, 2.5 * scale])
    assert v["curve"]["p"] == [0.1, 0.2, 0.7]
    assert v["curve"]["band"]["low"] == [0.1, 0.2, 0.25] and v["curve"]["band"]["high"] == [0.15, 0.2, 0.3]
    assert v["curve"]["band"]["n_directions"] == 2
    assert info["vectors"][0]["recommended"] == [] and info["vectors"][0]["curve"] is None  # nothing measured at 1


def test_next_tokens_are_the_steered_distribution_and_move_with_alpha(model, steer_set):
    body = {"vector": "joy/2", "prompt": "i am happy", "alpha": 1.5}
    (s0, at0, _), (s1, at1, _) = call(steer_set, [("POST", "/api/next", dict(body, alpha=0.0)), ("POST", "/api/next", body)])
    assert s0 == s1 == 200
    vec = steer_set.vectors["joy/2"]
    want = next_token_probs(model, vec, "i am happy", [1.5 / vec.resid_scale(model)], chat=True)[0]
    top = torch.topk(want, len(at1["tokens"]))
    assert [t["id"] for t in at1["tokens"]] == top.indices.tolist()
    assert [t["p"] for t in at1["tokens"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert at0["kl"] == pytest.approx(0.0, abs=1e-9) and at1["kl"] > 0
    assert [t["p"] for t in at0["tokens"]] != pytest.approx([t["p"] for t in at1["tokens"]], abs=1e-4)


def test_completions_carry_kl_and_the_degeneration_flag(steer_set):
    (status, out, _), = call(steer_set, [("POST", "/api/complete",
                                          {"vector": "joy/2", "prompt": "i am", "alpha": 1.0, "seed": 5})])
    assert status == 200 and len(out["completions"]) == USE.serve_completions
    assert all(c["kl_mean"] > 0 and isinstance(c["degenerate"], bool) for c in out["completions"])


BAD = [
    ({"vector": "joy/7", "prompt": "i am", "alpha": 0.5}, 400, "unknown vector 'joy/7'"),
    ({"vector": "joy/2", "prompt": "i am", "alpha": USE.alpha_resid_max + 1}, 400, "outside"),
    ({"vector": "joy/2", "prompt": "i am", "alpha": "strong"}, 400, "finite number"),
    ({"vector": "joy/2", "prompt": "i " * USE.max_prompt_chars, "alpha": 0.5}, 400, "characters"),
    ({"vector": "joy/2", "prompt": "", "alpha": 0.5}, 400, "non-empty"),
    ({"vector": "joy/2", "prompt": "i am", "alpha": 0.5, "seed": -1}, 400, "seed"),
    ("{not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
    (b"x" * (MAX_BODY + 10), 413, "over"),
]


def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(steer_set):
    good = ("POST", "/api/next", {"vector": "joy/2", "prompt": "i am", "alpha": 0.5})
    answers = call(steer_set, [("POST", "/api/complete" if i % 2 else "/api/next", body) for i, (body, _, _) in
                               enumerate(BAD)] + [good])
    for (status, out, _), (_, want, needle) in zip(answers, BAD):
        assert status == want and needle in out["error"], out
    assert answers[-1][0] == 200 and answers[-1][1]["tokens"]


def test_the_page_loads_nothing_from_elsewhere(steer_set):
    (status, html, headers), = call(steer_set, [("GET", "/", None)])
    assert status == 200 and "connect-src 'self'" in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "http://" not in html and "https://" not in html and "<link" not in html and " src=" not in html


@pytest.mark.parametrize("args, needle", [
    (["serve", "nowhere"], "does not exist"),
    (["serve"], "give a run directory"),
    (["serve", "-v", "v.safetensors", "--port", "0"], "--port"),
])
def test_cli_serve_bad_input_is_one_line(args, needle, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, monkeypatch, capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


# ----------------------------------------------------------------------------- the browser


class Background:
    """The app served on 127.0.0.1 from a thread (as `steerstrength serve` serves it), stopped on close."""

    def __init__(self, app):
        from aiohttp import web

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        def main():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(60)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


from test_report import CHROMIUM, Chromium  # noqa: E402  (the report's DevTools driver, reused)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (make test installs it: apt-get install -y chromium)")
def test_typing_and_sliding_change_the_tokens_in_chromium(steer_set, tmp_path):
    server = Background(make_app(steer_set))
    browser = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable", session=session)
        url = f"http://127.0.0.1:{server.port}/"
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired", timeout=60)

        def js(expression: str):
            result = browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                  session=session, timeout=60)
            assert "exceptionDetails" not in result, result
            return result["result"].get("value")

        bars = "Array.from(document.querySelectorAll('#bars .bar-row')).map(r => r.textContent).join('|')"
        status = "document.getElementById('status').textContent"

        def changed_from(before):  # the page updates after the server answers: poll, bounded
            for _ in range(600):
                now = js(bars)
                if now and now != before and js(status) == "":
                    return now
                time.sleep(0.1)
            raise AssertionError(f"the tokens did not change from {before!r}; status: {js(status)!r}")

        first = changed_from("")
        assert js("document.querySelectorAll('#track .mark').length") == 0  # layer 1: nothing recommended
        js("(() => { const p = document.getElementById('prompt'); p.value = 'the cat saw a dog';"
           " p.dispatchEvent(new Event('input', {bubbles: true})); })()")
        typed = changed_from(first)
        js("(() => { const s = document.getElementById('alpha'); s.value = s.max;"
           " s.dispatchEvent(new Event('input', {bubbles: true})); })()")
        moved = changed_from(typed)
        assert js("document.getElementById('alpha-value').textContent") == f"{USE.alpha_resid_max:.2f}"
        js("(() => { const v = document.getElementById('vector'); v.value = 'joy/2';"
           " v.dispatchEvent(new Event('change')); })()")
        assert js("document.querySelectorAll('#track .mark').length") == 2  # sweet-spot and iso-kl
        assert not js("document.getElementById('fluent').hidden")
        changed_from(moved)  # another layer's vector at the same alpha: another distribution
        for _ in range(600):  # the sampled completions arrive too
            if js("document.querySelectorAll('#completions .completion').length") == USE.serve_completions:
                break
            time.sleep(0.1)
        assert js("document.querySelectorAll('#completions .completion').length") == USE.serve_completions

        errors = [e for e in browser.events if
                  (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")) or
                  e.get("method") == "Runtime.exceptionThrown" or
                  (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert errors == []
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
        assert requests and all(u.startswith(url) for u in requests), requests
        assert any(u.endswith("/api/next") for u in requests) and any(u.endswith("/api/complete") for u in requests)
    finally:
        browser.close()
        server.close()


def test_cli_serve_reads_a_run_s_vectors_and_strength(run_dir, model, tmp_path, monkeypatch, capsys):
    import steerstrength.serve as serve_module

    model.hf.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    served = []
    monkeypatch.setattr(serve_module, "serve", lambda s, port, print_fn: served.append((s, port)))
    code, _, err = run_cli(["serve", run_dir, "-m", tmp_path / "tiny", "--port", "8799"], monkeypatch, capsys)
    assert code == 0, err
    (s, port), = served
    assert port == 8799 and list(s.vectors) == ["joy/1", "joy/2"]
    assert [r["method"] for r in s.info["joy/2"]["recommended"]] == ["sweet-spot", "iso-kl"]
