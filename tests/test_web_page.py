"""The demo web page renders recommendations in headless Chromium (Debian `chromium`).

A real uvicorn server runs the app on a tiny model against the session's redis-server; Chromium loads
the page for one user with a published think entry and the rendered DOM must show the history, the
offline reasoning and the recommended items with their source. Skipped (with the reason) only where
no Chromium binary is installed; `scripts/setup.sh` installs it on the project's machines.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from api_support import build_tiny_world, entry_for, make_settings, serving_http

from services.store import ThinkStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_page_renders_recommendations(tmp_path: Path, redis_server, ns: str) -> None:
    world = build_tiny_world(tmp_path)
    user = 3
    store = ThinkStore(redis.Redis.from_url(redis_server.url), ns)
    store.begin_version("v1", {"model": "tiny"})
    store.write_entries("v1", {user: entry_for(world, user, reasoning="likes tiny items of kind four")}, ttl_s=600)
    store.publish("v1", expected_users=1)
    store.write_histories({user: world.sequences[user]}, max_len=50)
    with serving_http(make_settings(world, redis_server.url, ns), timeout_s=60) as base:
        profile = tmp_path / "chrome-profile"
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
             f"{base}/?user={user}"],
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
