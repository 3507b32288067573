"""schemathesis against the crucible service through the hub's proxy, and against a user
server in remote mode that forwards to it, driven by the OpenAPI document each serves, with a
JupyterHub user's token: no input it generates (valid or not) gets a 5xx, an undocumented
status, or a body that breaks the schema."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis import checks as st
from schemathesis.generation.modes import GenerationMode

from tests.helpers.hub import Hub, user_server

pytestmark = pytest.mark.hub

MAX_EXAMPLES = 30
CHECKS = [
    st.not_a_server_error,
    st.status_code_conformance,
    st.content_type_conformance,
    st.response_headers_conformance,
    st.response_schema_conformance,
]


@pytest.fixture(scope="module", params=["service", "remote-mode server"])
def api_root(request: pytest.FixtureRequest, hub: Hub) -> Iterator[str]:
    """The API root under test: the service's, or that of fuzz's server forwarding to it."""
    if request.param == "service":
        yield hub.service_url + "api"
        return
    with user_server(hub, "fuzz") as server:
        yield server.api.rstrip("/")


@pytest.fixture(scope="module")
def service_schema(hub: Hub, api_root: str) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(api_root + "/openapi.json", headers=hub.headers("fuzz"))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_service_matches_its_openapi_document(
    service_schema: schemathesis.schemas.BaseSchema, hub: Hub, api_root: str, mode: GenerationMode
) -> None:
    base_url = api_root
    operations = [result.ok() for result in service_schema.get_all_operations()]
    assert len(operations) >= 9
    unsatisfiable: list[str] = []
    try:
        for operation in operations:

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                derandomize=True,
                database=None,
            )
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(
                    base_url=base_url, headers=hub.headers("fuzz"), checks=CHECKS, timeout=60
                )

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label
                unsatisfiable.append(operation.label)
        assert len(unsatisfiable) < len(operations)
    finally:  # leave nothing of fuzz's queued or running for the tests after this one
        code, page = hub.call("fuzz", "GET", "executions?limit=500")
        for execution in page.get("executions", []) if code == 200 else []:
            if execution["status"] in ("queued", "starting", "running"):
                hub.call("fuzz", "POST", f"executions/{execution['id']}/cancel")
