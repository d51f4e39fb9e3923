"""OpenAPI fuzzing of a running online API with schemathesis (v4 Python API), counted rather than raised.

Every operation of the served OpenAPI document gets `per_operation` Hypothesis cases in each generation
mode: *positive* (bodies, paths and queries the schema allows: must be answered 2xx with a body that
matches the schema) and *negative* (data the schema forbids: must be rejected with a documented 4xx).
Each response runs schemathesis' response checks (no 5xx, documented status code, content type and
headers, response body schema, negative data rejected, positive data accepted, auth not ignored).
A transport failure (connection refused, timeout) is counted too; nothing is retried.

Used by `benchmarks.faults` (>= 1000 cases against a uvicorn subprocess) and by `tests/test_api_fuzz.py`
(a few hundred cases in CI). Not a test by itself and not a load generator: cases run one at a time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok


@dataclass
class FuzzReport:
    cases: int = 0
    server_errors: int = 0  # responses with status >= 500
    transport_errors: int = 0  # no response at all
    check_failures: Counter[str] = field(default_factory=Counter)  # "<operation> <mode>: <check title>"
    statuses: Counter[str] = field(default_factory=Counter)  # "<operation> <mode> <status>"
    examples: list[str] = field(default_factory=list)  # a few failing cases, to reproduce

    @property
    def failures(self) -> int:
        return sum(self.check_failures.values())

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "server_errors": self.server_errors, "transport_errors": self.transport_errors,
            "check_failures": dict(self.check_failures), "statuses": dict(sorted(self.statuses.items())),
        }  # fmt: skip


def fuzz(base_url: str, per_operation: int, api_key: str | None = None, timeout_s: float = 10.0,
         max_examples_kept: int = 10) -> FuzzReport:
    """Fuzz every operation of `base_url`/openapi.json; `api_key` is sent on every case (not fuzzed)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=timeout_s)
    headers = {"X-API-Key": api_key} if api_key else None
    report = FuzzReport()
    session = requests.Session()
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise RuntimeError(f"the served OpenAPI document has an invalid operation: {result.err()}")
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(op, mode, base_url, headers, session, per_operation, timeout_s, report, max_examples_kept)
    session.close()
    return report


def _fuzz_operation(op: Any, mode: GenerationMode, base_url: str, headers: dict[str, str] | None,
                    session: requests.Session, n: int, timeout_s: float, report: FuzzReport, keep: int) -> None:
    label = f"{op.label} {mode.value}"

    # derandomize: the same cases on every run (a CI failure reproduces); no example database on disk
    @given(case=op.as_strategy(generation_mode=mode, headers=headers))
    @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)  # fmt: skip
    def one(case: Any) -> None:
        report.cases += 1
        try:
            response = case.call(base_url=base_url, session=session, timeout=timeout_s)
        except requests.RequestException as e:
            report.transport_errors += 1
            report.check_failures[f"{label}: transport {type(e).__name__}"] += 1
            return
        report.statuses[f"{label} {response.status_code}"] += 1
        report.server_errors += response.status_code >= 500
        try:
            case.validate_response(response, transport_kwargs={"base_url": base_url, "session": session})
        except BaseException as group:  # schemathesis' FailureGroup is an exception group of check failures
            failures = getattr(group, "exceptions", None)
            if failures is None:
                raise
            for f in failures:
                report.check_failures[f"{label}: {getattr(f, 'title', type(f).__name__)}"] += 1
            if len(report.examples) < keep:
                report.examples.append(f"{label}: {case.as_curl_command()} -> {response.status_code} "
                                       f"{response.text[:300]}")  # fmt: skip

    try:
        one()
    except Unsatisfiable:  # no negative cases exist (an operation without parameters or body)
        pass
