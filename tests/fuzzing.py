"""Schema-based fuzzing of a running trustray HTTP app with schemathesis (a helper of the tests, not a test).

`fuzz(url)` loads `{url}/openapi.json`, generates requests for every operation (valid ones from the declared
request models, then invalid ones), sends them over loopback and checks each answer: no status of 500 or above,
and a body that matches the declared answer (the 200 model or the error shape) with a declared content type.
Failures are collected, not raised, so one run counts them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable


@dataclass
class FuzzReport:
    cases: int = 0
    server_errors: list[str] = field(default_factory=list)
    schema_violations: list[str] = field(default_factory=list)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)

    def check(self, name: str, case: Any, response: Any) -> None:
        """Count one answer and record what is wrong with it."""
        from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

        self.cases += 1
        counts = self.statuses.setdefault(name, {})
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
        where = f"{name} {str(case.body)[:300]} -> {response.status_code}: {response.text[:200]!r}"
        if response.status_code >= 500:
            self.server_errors.append(where)
            return
        try:
            case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])
        except AssertionError as failure:  # schemathesis raises its failures as AssertionError subclasses
            self.schema_violations.append(f"{where} ({str(failure)[:300]})")


def fuzz(url: str, cases_per_operation: int = 25, headers: dict[str, str] | None = None,
         skip: tuple[str, ...] = (), models: tuple[str, ...] = ()) -> FuzzReport:
    """Fuzz every operation of the app at `url` but those whose path starts with one of `skip`, half of the cases
    valid and half invalid. Valid bodies that name a `model` name one of `models` instead (a random name only
    reaches the 404)."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith(skip):
            continue
        name = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            served = models if mode is GenerationMode.POSITIVE else ()
            try:
                _run(operation.as_strategy(generation_mode=mode), cases_per_operation // 2,
                     _sender(report, url, headers, name, served))
            except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body
                if mode is GenerationMode.POSITIVE:
                    raise
    return report


def _sender(report: FuzzReport, url: str, headers: dict[str, str] | None, name: str,
            models: tuple[str, ...]) -> Any:
    def send(case: Any) -> None:
        if models and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = models[report.cases % len(models)]
        report.check(name, case, case.call(base_url=url, headers=headers, timeout=120))

    return send


def _run(strategy: Any, examples: int, test: Any) -> None:
    """Run `test` on `examples` cases drawn from `strategy`, the same ones every run."""
    settings(max_examples=examples, deadline=None, database=None, derandomize=True,
             suppress_health_check=list(HealthCheck), phases=[Phase.generate])(given(strategy)(test))()
