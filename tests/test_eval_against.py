"""``python -m evaluation think-ahead --against NAMESPACE[:VERSION]``: the served policy over a second refresh's
entries of the same users (e.g. direct vs grounded think mode), compared paired with the first; a real
redis-server, a tiny randomly initialised OneRec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for

from services.config import get_settings
from services.harness import RedisServer
from services.store import ThinkEntry, ThinkStore


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TinyWorld]:
    w = build_tiny_world(tmp_path)
    monkeypatch.setenv("ONEREC_DATA_DIR", str(w.data_dir))
    monkeypatch.setenv("ONEREC_EXCLUDE_CONSUMED", "true")
    get_settings.cache_clear()
    yield w
    monkeypatch.undo()
    get_settings.cache_clear()


def _publish(client: redis.Redis, ns: str, world: TinyWorld, n_prefixes: int, holdout: int = 2) -> None:
    """Entries computed from the staler history (`refresh --holdout 2` for the test split), version v1, live."""
    store = ThinkStore(client, ns)
    entries: dict[int, ThinkEntry] = {}
    for user, seq in world.sequences.items():
        e = entry_for(world, user, n_prefixes=n_prefixes)
        e.history_len = len(seq) - holdout
        entries[user] = e
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", entries, 3600)
    store.publish("v1", len(entries))


def _run(world: TinyWorld, url: str, ns: str, against: str, capsys: pytest.CaptureFixture[str]) -> dict:
    from evaluation.think_ahead import main

    main(["--checkpoint", str(world.checkpoint), "--source", "redis", "--redis-url", url, "--namespace", ns,
          "--beam", "10", "--against", against])  # fmt: skip
    return json.loads(capsys.readouterr().out)


def test_against_serves_the_second_refresh_and_compares_paired(world: TinyWorld, redis_server: RedisServer,
                                                               redis_client: redis.Redis, ns: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _publish(redis_client, f"{ns}a", world, n_prefixes=3)
    _publish(redis_client, f"{ns}b", world, n_prefixes=1)
    out = _run(world, redis_server.url, f"{ns}a", f"{ns}b:v1", capsys)
    users = out["think_ahead_vs_against"]["users"]
    assert users == len(world.sequences) and out["against"]["source"] == f"{ns}b:v1"
    assert set(out["against"]) >= {"recall@10", "ndcg@10"}
    # the same refresh on both sides: the same rankings, nothing to tell apart
    same = _run(world, redis_server.url, f"{ns}a", f"{ns}a", capsys)
    assert same["against"]["recall@10"] == same["think_ahead"]["recall@10"]
    cmp = same["think_ahead_vs_against"]
    assert cmp["recall@10_diff"] == 0 and cmp["hits@10_only_a"] == cmp["hits@10_only_b"] == 0
    # the bar "cached-only >= online-only", paired: its mean difference is the difference of the two reported recalls;
    # with one cached prefix per user (namespace b) the strict rule ranks differently from the served one
    weak = _run(world, redis_server.url, f"{ns}b", f"{ns}a", capsys)
    assert weak["think_ahead_strict"]["ndcg@10"] != weak["think_ahead"]["ndcg@10"]
    for doc in (out, weak):
        strict = doc["think_ahead_strict_vs_onerec_as_served"]  # the world serves with consumed items excluded
        assert strict["users"] == users
        for m in ("recall@10", "ndcg@10"):
            diff = doc["think_ahead_strict"][m] - doc["onerec_as_served"][m]
            assert abs(strict[f"{m}_diff"] - diff) < 1e-5, m


def test_against_refuses_entries_of_the_wrong_history(world: TinyWorld, redis_server: RedisServer,
                                                      redis_client: redis.Redis, ns: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _publish(redis_client, f"{ns}a", world, n_prefixes=3)
    _publish(redis_client, f"{ns}c", world, n_prefixes=3, holdout=0)  # a refresh of the full history
    with pytest.raises(SystemExit, match="holdout 2"):
        _run(world, redis_server.url, f"{ns}a", f"{ns}c", capsys)


def test_a_missing_think_json_is_refused_before_the_evaluation_runs(tmp_path: Path) -> None:
    """`--think-json` is an input read after all the decoding: a wrong path is a usage error at once, not a
    traceback after the full run."""
    from evaluation.think_ahead import main

    with pytest.raises(SystemExit) as err:
        main(["--think-json", str(tmp_path / "missing.json"), "--redis-url", "redis://127.0.0.1:1/0"])
    assert err.value.code == 2


def test_own_only_arm_is_the_online_model_under_its_own_top_n(world: TinyWorld, redis_server: RedisServer,
                                                               redis_client: redis.Redis, ns: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`--own-only N`: the online model alone under its own top-N prefixes (no cached ones), paired with think-ahead;
    at the served N it is exactly the own-prefixes ablation; a count below 1 is a usage error."""
    from evaluation.think_ahead import main

    _publish(redis_client, ns, world, n_prefixes=3)
    main(["--checkpoint", str(world.checkpoint), "--source", "redis", "--redis-url", redis_server.url, "--namespace",
          ns, "--beam", "10", "--own-prefixes", "2", "--own-only", "2,6"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["own_prefixes_only_2"] == out["own_prefixes_only"]
    assert out["think_ahead_vs_own_prefixes_only_6"]["users"] == len(world.sequences)
    assert set(out["own_prefixes_only_6"]) >= {"recall@10", "ndcg@10"}
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(world.checkpoint), "--own-only", "0"])
    assert exc.value.code == 2


def test_item_weights_rank_with_the_entries_items(world: TinyWorld, redis_server: RedisServer,
                                                  redis_client: redis.Redis, ns: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`--item-weights W[,W]`: think-ahead with the entries' item log-probs at each weight, paired with think-ahead as
    served; weight 0 is the served arm itself (item_weight 0 by default), a large weight moves the lists, and
    `--item-weight W` serves what the sweep's arm W measured."""
    from evaluation.think_ahead import main

    _publish(redis_client, ns, world, n_prefixes=3)
    store = ThinkStore(redis_client, ns)
    ids = [int(i) for i in world.sid.item_ids.tolist()]
    entries = {u: store.get_entry("v1", u) for u in world.sequences}
    for en in entries.values():  # a ranking the model does not have: the catalogue's last items, in reverse
        assert en is not None
        en.items = [(i, -0.2 * r) for r, i in enumerate(reversed(ids[-60:]))]
    store.begin_version("v2", {"model": "think-test"})
    store.write_entries("v2", {u: en for u, en in entries.items() if en is not None}, 3600)
    store.publish("v2", len(entries))
    base = ["--checkpoint", str(world.checkpoint), "--source", "redis", "--redis-url", redis_server.url,
            "--namespace", ns, "--beam", "10", "--own-prefixes", "2"]
    main([*base, "--item-weights", "0,20"])
    out = json.loads(capsys.readouterr().out)
    assert out["think_ahead_item_weight_0"] == out["think_ahead"]
    assert out["think_ahead_item_weight_0_vs_think_ahead"]["ndcg@10_diff"] == 0
    assert out["think_ahead_item_weight_20"]["ndcg@10"] != out["think_ahead"]["ndcg@10"]
    assert out["think_ahead_item_weight_20_vs_onerec_as_served"]["users"] == len(world.sequences)
    main([*base, "--item-weight", "20"])
    assert json.loads(capsys.readouterr().out)["think_ahead"] == out["think_ahead_item_weight_20"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--item-weights", "-1"])
    assert exc.value.code == 2
