"""The demo web page renders recommendations in headless Chromium (Debian `chromium`).

A real uvicorn server runs the app on a tiny model against the session's redis-server; Chromium loads
the page for one user with a published think entry and the rendered DOM must show the history, the
offline reasoning and the recommended items with their source. Skipped (with the reason) only where
no Chromium binary is installed; `scripts/setup.sh` installs it on the project's machines.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis
import uvicorn
from api_support import build_tiny_world, entry_for, make_settings

from online_api.app import create_app
from services.store import ThinkStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_page_renders_recommendations(tmp_path: Path, redis_server, ns: str) -> None:
    world = build_tiny_world(tmp_path)
    user = 3
    store = ThinkStore(redis.Redis.from_url(redis_server.url), ns)
    store.begin_version("v1", {"model": "tiny"})
    store.write_entries("v1", {user: entry_for(world, user, reasoning="likes tiny items of kind four")}, ttl_s=600)
    store.publish("v1", expected_users=1)
    store.write_histories({user: world.sequences[user]}, max_len=50)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(make_settings(world, redis_server.url, ns)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "API not ready"
            time.sleep(0.1)
        profile = tmp_path / "chrome-profile"
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
             f"http://127.0.0.1:{port}/?user={user}"],
            capture_output=True, text=True, timeout=120,
        )
        dom = out.stdout
        assert "<ol id=\"recs\">" in dom, out.stderr[-2000:]
        recs = dom.split('<ol id="recs">', 1)[1].split("</ol>", 1)[0]
        assert recs.count("<li") >= 5, recs[:2000]  # the page asks for k=10 from 120 tiny items
        assert "Tiny item" in recs
        assert "likes tiny items of kind four" in dom  # offline reasoning shown
        assert "think-ahead" in dom  # source of the answer
        history = dom.split('<ol id="history">', 1)[1].split("</ol>", 1)[0]
        assert history.count("<li") >= 1
    finally:
        server.should_exit = True
        thread.join(10)
