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

from model.think.grounding import Grounding
from services.catalog import load_items
from services.store import ThinkStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(base: str, user: int, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, f"{base}/?user={user}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_page_renders_recommendations(tmp_path: Path, redis_server, ns: str) -> None:
    world = build_tiny_world(tmp_path)
    user, silent = 3, 4
    grounding = Grounding.build(load_items(world.data_dir / "items.tsv"), world.sid)
    hist = world.sequences[user]
    rationale = grounding.teach(hist, hist[-2:], hist[-1])  # the grounded format, naming two history items
    named = [i for i in grounding.recent(hist) if f'"{grounding.titles[i]}"' in rationale]
    assert named
    store = ThinkStore(redis.Redis.from_url(redis_server.url), ns)
    store.begin_version("v1", {"model": "tiny"})
    store.write_entries("v1", {user: entry_for(world, user, reasoning=rationale),
                               silent: entry_for(world, silent, reasoning="")}, ttl_s=600)
    store.publish("v1", expected_users=2)
    store.write_histories({u: world.sequences[u] for u in (user, silent)}, max_len=50)
    with serving_http(make_settings(world, redis_server.url, ns), timeout_s=60) as base:
        out = _chromium(base, user, tmp_path / "chrome-profile", "--dump-dom")
        dom = out.stdout
        assert "<ol id=\"recs\">" in dom, out.stderr[-2000:]
        recs = dom.split('<ol id="recs">', 1)[1].split("</ol>", 1)[0]
        assert recs.count("<li") >= 5, recs[:2000]  # the page asks for k=10 from 120 tiny items
        assert "Tiny item" in recs
        assert "think-ahead" in dom  # source of the answer
        history = dom.split('<ol id="history">', 1)[1].split("</ol>", 1)[0]
        assert history.count("<li") >= 1 and f'id="h-{named[0]}"' in history
        reasoning = dom.split('<div id="reasoning"', 1)[1].split("</div>", 1)[0]
        # each named history item is a link to that item, its full title on hover
        assert f'href="#h-{named[0]}"' in reasoning and f'title="Tiny item {named[0]}"' in reasoning
        assert "next: " in reasoning
        cats = dom.split('<div id="reasoning-cats"', 1)[1].split("</div>", 1)[0]
        assert "categories:" in cats and 'class="cat named"' in cats
        assert 'class="cat' in recs  # each recommended item shows its category
        assert 'class="cat named"' in recs  # ... marked where the reasoning names it (one label here)

        empty = _chromium(base, silent, tmp_path / "chrome-profile-2", "--dump-dom").stdout
        assert "no reasoning stored for this user" in empty  # not an empty box

        shot = tmp_path / "page.png"
        _chromium(base, user, tmp_path / "chrome-profile-3", f"--screenshot={shot}", "--window-size=1200,900")
        assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
