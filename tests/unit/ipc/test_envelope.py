"""The error envelope: what ``error_body`` builds, ``parse_error`` reads back; anything else reads as the status."""

from __future__ import annotations

import pytest

from cvmotion.ipc.envelope import ErrorInfo, error_body, parse_error
from cvmotion.ipc.openapi import ErrorEnvelope


def test_what_is_built_is_read_back_and_matches_the_schema() -> None:
    body = error_body("PolicyViolation", "refused", violations=["tcb too old"])
    ErrorEnvelope.model_validate(body)
    assert parse_error(422, body) == ErrorInfo(422, "PolicyViolation", "refused", ("tcb too old",))


@pytest.mark.parametrize("data", [None, [], "text", {}, {"error": "x"}, {"error": {}}, {"detail": "no"}])
def test_an_answer_that_is_no_envelope_reads_as_its_status(data: object) -> None:
    assert parse_error(502, data) == ErrorInfo(502, "http_error", "HTTP 502")
