"""schemathesis against the server's own OpenAPI schema, on a real uvicorn server: every
operation with schema-valid (positive) and schema-violating (negative) requests, within a small
fixed budget. Checked: conformance of the status code, content type, headers and body to the
schema; negative data rejected with a 4xx; no 5xx other than a 504 for a `deadline_ms` too
short to meet; every error a JSON {"error", "detail"}."""

from __future__ import annotations

import schemathesis
from hypothesis import given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

BUDGET = settings(max_examples=40)  # the rest: the "unetpp" profile (tests/conftest.py)
# Replaced by `expected_errors` below: a 504 for a deadline the request itself set is correct.
# Schema-valid is not always acceptable here: any bytes are a valid `binary` image, but only a
# PNG, JPEG or TIFF decodes (400/415), and at most one routing rule may be given (422).
EXCLUDED = [not_a_server_error, positive_data_acceptance]


def expected_errors(case, response) -> None:
    status = response.status_code
    if status < 400:
        return
    body = response.json()
    assert set(body) == {"error", "detail"}, (case.path, body)
    if status >= 500:
        assert status == 504 and body["error"] == "deadline_exceeded", (case.path, body)
        assert "deadline_ms" in (case.query or {}), (case.path, case.query)


def test_the_api_conforms_to_its_schema(live):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/segment", "/v1/models", "/readyz"} <= {op.path for op in operations}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @BUDGET
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call_and_validate(base_url=live.url, excluded_checks=EXCLUDED)
                expected_errors(case, response)
                label = f"{case.operation.method.upper()} {case.operation.path}"
                statuses.setdefault(label, set()).add(response.status_code)

            try:
                run()
            except Unsatisfiable:  # nothing to violate (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE
    # the fuzzing reached the model: real segmentations and real refusals both happened
    assert {200, 400, 422} <= statuses["POST /v1/segment"]
    assert live.client.get("/readyz").status_code == 200
