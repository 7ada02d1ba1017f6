"""Property-based bad input: schemathesis generates requests from the live
``GET /openapi.json`` (valid bodies, and invalid ones: wrong types, missing fields, values
out of range) and sends them to the real control plane.

Bounded so that it fits ``make test``: Hypothesis derandomized (a fixed seed), a few
examples per operation and mode, no deadline (the machine is shared; timing is not what
is tested). Every answer must be below 500, every 4xx of an API route must be the OpenAI
error envelope with an ``x-request-id``, and no call may hang (a 30 s socket timeout turns
a hang into a failure).

The pytest plugin of schemathesis 4 does not load under pytest 9 (``Function._nodeid``),
so operations are taken from the loaded schema and driven by ``hypothesis.given`` here.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis

from tests import fleet
from tests.badinput.conftest import Gateway

OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
              ("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/api/v1/stats"),
              ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"),
              ("GET", "/openapi.json"), ("POST", "/v1/responses"), ("POST", "/v1/messages"),
              ("POST", "/v1/messages/count_tokens"), ("POST", "/tokenize"),
              ("POST", "/detokenize")]
# Routes whose answers are not API errors (text, the spec, liveness/readiness status).
NO_ENVELOPE = {"/metrics", "/openapi.json", "/ready", "/health"}
MAX_EXAMPLES = 10


@pytest.fixture(scope="module")
def api_schema(gateway: Gateway) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


def steer(case: schemathesis.Case, positive: bool) -> None:
    """A valid key always (auth has its own tests), and in positive mode a model that
    exists, so that generated requests get past the front door to validation and the
    backends instead of stopping at 401/404."""
    key = fleet.ADMIN_KEY if case.path in ("/api/v1/stats", "/metrics") else fleet.TENANT_KEY
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
    if positive and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = fleet.EMBED if case.path == "/v1/embeddings" else "llama"


def check(case: schemathesis.Case, gateway: Gateway, positive: bool) -> None:
    steer(case, positive)
    response = case.call(base_url=gateway.url, timeout=30)
    where = (case.method, case.path, response.status_code, response.text[:400])
    assert response.status_code < 500, where
    if response.status_code >= 400 and case.path not in NO_ENVELOPE:
        gateway.bodies.append(response.content)
        reply = fleet.Reply(response.status_code, dict(response.headers), response.content)
        assert (_anthropic_error(reply) if case.path.startswith("/v1/messages")
                else reply.is_envelope()), where
        assert response.headers.get("x-request-id"), where


def _anthropic_error(reply: fleet.Reply) -> bool:
    """Anthropic's error shape, which the paths under /v1/messages answer in."""
    data = reply.json()
    err = data.get("error") if isinstance(data, dict) else None
    return (isinstance(data, dict) and data.get("type") == "error" and isinstance(err, dict)
            and isinstance(err.get("type"), str) and isinstance(err.get("message"), str))


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_5xx_and_every_error_is_an_envelope(api_schema: schemathesis.BaseSchema,
                                               gateway: Gateway, method: str, path: str,
                                               mode: schemathesis.GenerationMode) -> None:
    operation = api_schema[path][method]

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    def run(case: schemathesis.Case) -> None:
        check(case, gateway, mode == schemathesis.GenerationMode.POSITIVE)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # GET routes without parameters have no negative examples to generate.
        assert mode == schemathesis.GenerationMode.NEGATIVE and method == "GET"


def test_still_serving_after_the_fuzzing(gateway: Gateway) -> None:
    fleet.still_serving(gateway.url)
