"""The one think-ahead policy: evaluation ranks a user exactly as `POST /v1/recommend` does (real redis-server,
tiny OneRec), and its rules (consumed items, fill, no-retry) on a scripted model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, running_app
from conftest import RedisServer

from evaluation.think_ahead import ThinkAheadRecommender
from model.onerec import OneRec
from model.policy import FALLBACK, ONLINE, THINK, PolicyConfig, Popularity, Prefix, Scored, rank_batch
from services.catalog import Example, load_dataset
from services.config import Settings
from services.store import ThinkEntry, ThinkStore

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize(("exclude_consumed", "item_weight"), [(True, 0.0), (False, 0.0), (True, 2.0)])
def test_evaluation_ranks_as_served(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis, ns: str,
                                    exclude_consumed: bool, item_weight: float) -> None:
    """Same entry, same history, same Settings: the served list and the evaluated list are the same items in
    the same order, for users with an entry (think-ahead) and without one (online-only); with item scores in the
    entries (`item_weight` > 0) too."""
    settings = make_settings(world, redis_server.url, ns, exclude_consumed=exclude_consumed, own_prefixes=4,
                             item_weight=item_weight)
    store = ThinkStore(redis_client, ns)
    with_entry = [3, 5, 8, 13]
    entries: dict[int, ThinkEntry] = {u: entry_for(world, u, n_prefixes=2) for u in with_entry}
    if item_weight:  # the catalogue's last items scored high, in reverse order: a ranking the model does not have
        ids = [int(i) for i in world.sid.item_ids.tolist()]
        for en in entries.values():
            en.items = [(i, -0.3 * r) for r, i in enumerate(reversed(ids[-40:]))]
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", entries, 3600)
    store.publish("v1", len(entries))
    users = [*with_entry, 7, 11]
    store.write_histories({u: world.sequences[u] for u in users}, settings.history_max)

    ds = load_dataset(world.data_dir)
    onerec = OneRec.load(world.checkpoint)
    # the API's popularity: every known interaction, restricted to items with codes (`online_api.app`)
    popularity = Popularity(ds.sequences.values(), {int(i) for i in onerec.sid.item_ids})
    rec = ThinkAheadRecommender(onerec, lambda ex: [entries.get(e.user_id) for e in ex],
                                PolicyConfig.from_settings(settings), popularity)
    k = 10
    with running_app(settings) as c:
        for u in users:
            body = c.post("/v1/recommend", json={"user_id": u, "k": k}).json()
            served = [it["item_id"] for it in body["items"]]
            assert body["source"] == (THINK if u in entries else ONLINE), body
            evaluated = rec.recommend([Example(u, ds.sequences[u][-settings.history_max:], -1)], k)[0]
            assert evaluated == served, (u, evaluated, served)
            consumed = set(world.sequences[u]) & set(served)
            assert not consumed if exclude_consumed else True
    assert rec.sources == {THINK: len(with_entry), ONLINE: 2}


class Scripted:
    """A `PolicyModel` that answers from fixed lists and records what it was asked."""

    def __init__(self, complete: Scored | None, full: Scored | None) -> None:
        self.c, self.f = complete, full
        self.calls: list[tuple[str, set[int]]] = []

    async def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                       exclude: Sequence[set[int]]) -> list[Scored | None]:
        self.calls.append(("complete", exclude[0]))
        return [self.c]

    async def full(self, histories: Sequence[Sequence[int]], k: int,
                   exclude: Sequence[set[int]]) -> list[Scored | None]:
        self.calls.append(("full", exclude[0]))
        return [self.f]


def _rank(cfg: PolicyConfig, model: Scripted | None, prefixes: list[Prefix] | None, k: int = 4):  # type: ignore[no-untyped-def]
    pop = Popularity([[1, 1, 1, 2, 2, 3, 4, 5]])
    return asyncio.run(rank_batch(cfg, model, pop, [[1, 9]], [prefixes], k))[0]


def test_policy_rules() -> None:
    served = PolicyConfig.from_settings(Settings(), own_prefixes=0)
    plain = PolicyConfig.from_settings(Settings(), own_prefixes=0, exclude_consumed=False)
    # consumed rule: the history is what the model is told to exclude, and what the fill skips
    m = Scripted([(7, -1.0)], None)
    r = _rank(served, m, [(0, 0, -0.1)])
    assert m.calls == [("complete", {1, 9})] and r.source == THINK
    assert r.items == [(7, -1.0, THINK), (2, pytest.approx(r.items[1][1]), FALLBACK), (3, r.items[2][1], FALLBACK),
                       (4, r.items[3][1], FALLBACK)]  # fill: popular items, neither consumed (1) nor listed
    m = Scripted([(7, -1.0)], None)
    assert [i for i, _, _ in _rank(plain, m, [(0, 0, -0.1)]).items] == [7, 1, 2, 3] and m.calls[0][1] == set()
    # nothing under the prefixes: full decode; a failure no second call fixes (None): straight to the fill
    m = Scripted([], [(8, -2.0)])
    assert _rank(served, m, [(0, 0, -0.1)]).source == ONLINE and [c for c, _ in m.calls] == ["complete", "full"]
    m = Scripted(None, [(8, -2.0)])
    r = _rank(served, m, [(0, 0, -0.1)])
    assert r.source == FALLBACK and [c for c, _ in m.calls] == ["complete"] and len(r.items) == 4
    # no entry: full decode only; no model: popular items only
    m = Scripted([(7, -1.0)], [(8, -2.0)])
    assert _rank(served, m, None).source == ONLINE and [c for c, _ in m.calls] == ["full"]
    assert [i for i, _, _ in _rank(served, None, [(0, 0, -0.1)]).items] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="own_prefixes"):
        PolicyConfig.from_settings(Settings(), own_prefixes=0, use_cached=False)


def test_item_scores_rank_the_whole_beam() -> None:
    """With `item_weight` > 0 the model is asked for the whole beam and the entry's item log-probs re-rank it
    before the top k are kept; items the entry does not list get its weakest log-prob; weight 0 changes nothing."""
    beam = [(10, -1.0), (11, -1.5), (12, -2.0), (13, -2.5), (14, -3.0), (15, -3.5)]

    class Asked(Scripted):
        def __init__(self) -> None:
            super().__init__(None, None)
            self.k: list[int] = []

        async def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                           exclude: Sequence[set[int]]) -> list[Scored | None]:
            self.k.append(k)
            return [beam[:k]]

    items = [(14, -0.1), (15, -0.2), (10, -3.0)]  # 11, 12, 13 unlisted: the floor, -3.0
    cfg = PolicyConfig.from_settings(Settings(), beam=6, own_prefixes=0, item_weight=1.0)
    m = Asked()
    r = asyncio.run(rank_batch(cfg, m, Popularity([[1]]), [[1, 9]], [[(0, 0, -0.1)]], 3, [items]))[0]
    assert m.k == [6] and r.source == THINK
    assert r.items == [(14, pytest.approx(-3.1), THINK), (15, pytest.approx(-3.7), THINK),
                       (10, pytest.approx(-4.0), THINK)]
    # weight 0, or no items: the model's own top k, asked for k only
    for c, its in ((replace(cfg, item_weight=0.0), [items]), (cfg, [None])):
        m = Asked()
        r = asyncio.run(rank_batch(c, m, Popularity([[1]]), [[1, 9]], [[(0, 0, -0.1)]], 3, its))[0]
        assert m.k == [3] and [i for i, _, _ in r.items] == [10, 11, 12]
    with pytest.raises(ValueError, match="items"):
        asyncio.run(rank_batch(cfg, Asked(), Popularity([[1]]), [[1]], [None], 3, []))
    with pytest.raises(ValueError, match="item_weight"):
        replace(cfg, item_weight=-1.0)
