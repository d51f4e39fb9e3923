"""What the main job (`scripts.demo`) reports: the test-split quality table, the stage-time table and the
whole-job progress line with an ETA.

``python -m scripts.demo_report quality --namespace NS --users N --out FILE`` measures, on the test split of
the first N users (sorted ids, the users the demo's evaluation refresh computed), three systems under the
same leave-one-out protocol and the served policy (`model.policy`, the consumed-item rule in force):
MostPop (most interacted training items), online (the lightweight OneRec alone, as `POST /v1/recommend`
answers a user without a think entry) and think-ahead (OneRec completing under the offline prefixes that a
``refresh --holdout 2`` wrote into NS: reasoning on a history one interaction staler than the evaluated one).
It writes the numbers as JSON; `quality_table` prints them. Not an evaluation mode of its own: the full
protocol and its options are ``python -m evaluation think-ahead``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def fmt_s(seconds: float) -> str:
    """``95`` -> ``1m35s``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class JobClock:
    """Stage times of the whole job and its ETA: expected seconds per stage (the profile's, measured on a
    2-core machine) scaled by how fast this machine ran the stages done so far."""

    expected: dict[str, float]  # stage -> expected seconds, in job order
    out: Callable[[str], None] = print
    heartbeat_s: float = 60.0
    done: dict[str, float] = field(default_factory=dict)  # stage -> measured seconds
    reused: set[str] = field(default_factory=set)
    t0: float = field(default_factory=time.perf_counter)

    def speed(self) -> float:
        """Measured / expected over the stages that ran (1.0 before any), clamped to [0.25, 4]."""
        ran = [s for s in self.done if s not in self.reused and self.expected.get(s)]
        if not ran:
            return 1.0
        return min(4.0, max(0.25, sum(self.done[s] for s in ran) / sum(self.expected[s] for s in ran)))

    def left_s(self, running: str | None = None, running_s: float = 0.0) -> float:
        todo = [s for s in self.expected if s not in self.done]
        left = sum(self.expected[s] for s in todo) * self.speed()
        if running in todo:  # the running stage's part already spent (never below zero)
            left -= min(running_s, self.expected[running] * self.speed())
        return max(0.0, left)

    def line(self, running: str | None = None, running_s: float = 0.0) -> str:
        n = len(self.expected)
        k = len(self.done)
        now = f"stage {k + 1}/{n} {running} running {fmt_s(running_s)}" if running else f"{k}/{n} stages done"
        left = fmt_s(self.left_s(running, running_s))
        return f"[job] {now}; {fmt_s(time.perf_counter() - self.t0)} elapsed, about {left} left (estimate)"

    def run(self, stage: str, work: Callable[[], bool | None]) -> None:
        """Run one stage (`work` returns True when it reused built artifacts), with a progress line every
        `heartbeat_s` while it runs and one when it is done."""
        start = time.perf_counter()
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                self.out(self.line(stage, time.perf_counter() - start))

        ticker = threading.Thread(target=beat, daemon=True)
        ticker.start()
        try:
            reused = work()
        finally:
            stop.set()
            ticker.join()
        self.done[stage] = time.perf_counter() - start
        if reused:
            self.reused.add(stage)
        self.out(self.line())

    def table(self, profile: str) -> str:
        rows = [f"Stage times (profile {profile}; expected: the profile's estimate for a 2-core machine, README)",
                f"  {'stage':24s} {'took':>15s} {'expected':>9s}"]
        for stage, exp in self.expected.items():
            took = self.done.get(stage)
            shown = "-" if took is None else fmt_s(took) + (" (reused)" if stage in self.reused else "")
            rows.append(f"  {stage:24s} {shown:>15s} {fmt_s(exp):>9s}")
        total = sum(self.done.values())
        rows.append(f"  {'total':24s} {fmt_s(total):>15s} {fmt_s(sum(self.expected.values())):>9s}")
        return "\n".join(rows)


def quality_table(doc: dict[str, Any]) -> str:
    """The quality JSON of `measure_quality` as a short table."""
    rule = "exclude consumed items" if doc["exclude_consumed"] else "keep consumed items"
    rows = [f"Quality on the test split (profile {doc['profile']}: {doc['profile_note']})",
            f"  {doc['users']} users (the first by id), last item held out, ranked over all {doc['items']} items; "
            f"consumed-item rule: {rule} ({doc['rule_source']})",
            f"  {'system':46s} {'R@10':>7s} {'N@10':>7s} {'R@5':>7s}"]
    for name, m in doc["systems"].items():
        rows.append(f"  {name:46s} {m['recall@10']:7.4f} {m['ndcg@10']:7.4f} {m['recall@5']:7.4f}")
    rows.append(f"  think-ahead coverage: {doc['think_ahead_coverage']:.0%} of these users had an offline entry; "
                "higher is better for every column (a hit rate and its rank-discounted form)")
    return "\n".join(rows)


def measure_quality(namespace: str, users: int | None, profile: str, profile_note: str) -> dict[str, Any]:
    """MostPop, online and think-ahead on the test split of the first `users` users (module docstring)."""
    from evaluation.think_ahead import StoreSource, ThinkAheadRecommender, require_staler, train_popularity
    from model.metrics import MostPopular, evaluate
    from model.onerec import OneRec
    from model.policy import PolicyConfig
    from services.catalog import load_dataset
    from services.config import get_settings
    from services.store import ThinkEntry, ThinkStore
    from services.store.connect import connect

    s = get_settings()
    ds = load_dataset(s.data_dir)
    chosen = set(sorted(ds.sequences)[:users] if users else ds.sequences)
    examples = [e for e in ds.splits.test if e.user_id in chosen]
    checkpoint = s.resolved("onerec")
    onerec = OneRec.load(checkpoint)
    served = PolicyConfig.from_settings(s)
    popularity = train_popularity(ds.sequences, "test", {int(i) for i in onerec.sid.item_ids})
    source = StoreSource(ThinkStore(connect(s.redis_url), namespace))
    require_staler(ds.sequences, examples, source(examples), "test")

    def none(ex: Any) -> list[ThinkEntry | None]:
        return [None for _ in ex]

    think_ahead = ThinkAheadRecommender(onerec, source, served, popularity)
    systems = {
        "MostPop (most interacted training items)": evaluate(MostPopular(ds.sequences, holdout=1), examples,
                                                             desc="MostPop"),
        f"online (OneRec {checkpoint.resolve().name})": evaluate(
            ThinkAheadRecommender(onerec, none, served, popularity), examples, desc="online"),
        "think-ahead (OneRec + offline OneRec-Think)": evaluate(think_ahead, examples, desc="think-ahead"),
    }
    rule = s.consumed_rule()
    return {"profile": profile, "profile_note": profile_note, "users": len(examples), "items": len(ds.catalog),
            "exclude_consumed": served.exclude_consumed, "rule_source": rule.source,
            "think_ahead_coverage": think_ahead.with_entry / max(1, len(examples)), "checkpoint": str(checkpoint),
            "systems": systems}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.demo_report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality", help="test-split quality of MostPop, online and think-ahead (JSON)")
    q.add_argument("--namespace", required=True, help="namespace of the `refresh --holdout 2` entries")
    q.add_argument("--users", type=int, default=None, help="first N users by id (default: all)")
    q.add_argument("--profile", default="quick", help="profile name shown with the numbers")
    q.add_argument("--profile-note", default="", help="what the profile's numbers are")
    q.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    doc = measure_quality(args.namespace, args.users, args.profile, args.profile_note)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
