"""Schemathesis over /openapi.json of the running app: a bounded number of generated
requests per operation. Valid ones: no 5xx, and every answer matches the schema (status
code, content type, headers, body). Invalid ones (negative mode): never a 5xx; their other
answers are not checked, since some are not even HTTP (a header name with ';') and uvicorn
answers those with a plain-text 400 before the app sees them.

Driven through hypothesis directly rather than schemathesis' pytest plugin, which does not
load under this pytest; the cases and checks are schemathesis' own either way."""

from __future__ import annotations

import itertools

import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mailer.config import Settings

from .conftest import AUTH, serving_in_thread, with_api

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 25


def _check(operation: APIOperation, mode: GenerationMode, url: str) -> None:
    checks = CHECKS if mode is GenerationMode.POSITIVE else [not_a_server_error]

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def conforms(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=url, headers=AUTH, checks=checks, timeout=30)

    try:
        conforms()
    except Unsatisfiable:
        # No invalid request exists for an operation without parameters or body (/v1/health).
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_every_operation_conforms_to_the_schema(settings: Settings) -> None:
    with serving_in_thread(with_api(settings)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} == {
            "POST /v1/emails",
            "POST /v1/emails/batch",
            "GET /v1/emails/{mail_id}",
            "DELETE /v1/emails/{mail_id}",
            "GET /v1/health",
            "GET /v1/ready",
            "POST /v1/webhooks/{vendor}",
            "GET /v1/suppressions",
            "POST /v1/suppressions",
            "DELETE /v1/suppressions/{address}",
        }
        for operation, mode in itertools.product(operations, GenerationMode):
            _check(operation, mode, url)
