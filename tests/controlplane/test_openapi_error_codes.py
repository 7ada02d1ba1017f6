"""The OpenAPI document names every ``error.code`` a model's path can answer 503 with
(:mod:`controlplane.api.openapi`, :mod:`controlplane.api.openapi_surface`): the codes
are read from the error classes themselves, so a new kind of 503 that is not documented
fails here."""

from __future__ import annotations

from controlplane import errors
from controlplane.api import openapi, readiness
from tests.controlplane import cp_testing as t


def _raised_503_codes() -> set[str]:
    """The default code of every 503 class of :mod:`controlplane.errors`, and the code a
    draining replica answers with."""
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.SynapseError)]
    codes = {c.default_code for c in classes if c.http_status == 503 and c.default_code}
    return (codes | {readiness.SHUTTING_DOWN_CODE}) - ADMIN_ONLY


# 503 codes no model's path answers with: Admin.GetUsage's (gRPC, not in the document)
ADMIN_ONLY = {errors.USAGE_STORE_CODE}


def test_every_503_code_is_documented_on_every_model_path() -> None:
    codes = _raised_503_codes()
    assert {"no_backend", "queue_timeout", errors.BUSY_CODE} <= codes
    paths = openapi.spec(t.settings())["paths"]
    described = {path: op["post"]["responses"]["503"]["description"]
                 for path, op in paths.items() if "post" in op}
    assert "/v1/chat/completions" in described and "/v1/responses" in described
    for path, why in described.items():
        if path.startswith("/v1/messages"):     # Anthropic's errors carry no code
            assert why.startswith("overloaded_error"), path
            continue
        missing = {code for code in codes if code not in why}
        assert not missing, f"{path}: 503 codes not documented: {sorted(missing)}"


def test_a_spent_answer_budget_is_a_503_with_retry_after() -> None:
    busy = errors.Busy("no room")
    assert busy.http_status == 503 and busy.code == errors.BUSY_CODE == "upstream_busy"
    assert isinstance(busy, errors.Unavailable) and "Retry-After" in busy.headers()
    assert busy.envelope()["error"]["type"] == "service_unavailable"
