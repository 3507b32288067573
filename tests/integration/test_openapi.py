"""schemathesis against the live server, driven by the OpenAPI document it serves: no input it
generates (valid or not) gets a 5xx, an undocumented status, or a body that breaks the schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis import checks as st
from schemathesis.generation.modes import GenerationMode

from tests.helpers.jupyter import ServerProcess

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 30

CHECKS = [
    st.not_a_server_error,
    st.status_code_conformance,
    st.content_type_conformance,
    st.response_headers_conformance,
    st.response_schema_conformance,
]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("openapi") / "root"
    root.mkdir()
    server = ServerProcess(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def crucible_schema(live_server: ServerProcess) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(
        live_server.url + "crucible/api/openapi.json",
        headers={"Authorization": f"token {live_server.token}"},
    )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_matches_its_openapi_document(
    crucible_schema: schemathesis.schemas.BaseSchema,
    live_server: ServerProcess,
    mode: GenerationMode,
):
    auth = {"Authorization": f"token {live_server.token}"}
    base_url = live_server.url + "crucible/api"
    operations = [result.ok() for result in crucible_schema.get_all_operations()]
    assert len(operations) >= 9  # (schemathesis leaves out the document's own path)
    unsatisfiable: list[str] = []
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
            case.call_and_validate(base_url=base_url, headers=auth, checks=CHECKS, timeout=60)

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            # no input violates this operation's schema (e.g. a free-text path id): nothing
            # negative to send
            assert mode is GenerationMode.NEGATIVE, operation.label
            unsatisfiable.append(operation.label)
    assert len(unsatisfiable) < len(operations)


def test_the_document_is_served_and_valid(crucible_schema: schemathesis.schemas.BaseSchema):
    raw = crucible_schema.raw_schema
    assert raw["openapi"].startswith("3.")
    assert {"/executions", "/executions/{execution_id}", "/queue", "/stats", "/health"} <= set(
        raw["paths"]
    )
