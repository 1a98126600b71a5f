"""Property-based fuzzing of every public route from the service's own OpenAPI schema (schemathesis + hypothesis):
whatever a client sends, the answer is never a 5xx and always matches the documented response schema, status codes
and content types. Bounded: a fixed number of examples per route, no deadline (CI machines are shared)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings
from tests.support.service import ADMIN_TOKEN, record

# The schema is read from the document (an app that only builds it, never started, so it creates no data directory);
# every call goes to the fixture's app through the session each test passes.
NEVER_STARTED = Path("/nonexistent-never-started")
DOCUMENT = create_app(Settings(data_dir=NEVER_STARTED, admin_token=ADMIN_TOKEN)).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT).include(tag="public")


def body_limit_rejects(fuzzed: schemathesis.BaseSchema) -> schemathesis.BaseSchema:
    """A 413 (the body limit, refused before it is parsed) is a rejection of invalid data too: the fuzz once built a
    5 MB columnar body of garbage rows, which the app refused as too large, not as malformed."""
    expected = fuzzed.config.checks.negative_data_rejection.expected_statuses
    if "413" not in expected:  # the loaded schemas may share one configuration
        expected.append("413")
    return fuzzed


body_limit_rejects(schema)
# The classifier over categories, integers and gaps: its request models (enums, nullable fields, typed column rows)
# and its answers (labels, probabilities, sets) are generated from another schema, so they are fuzzed on their own.
PENGUINS = Path(__file__).resolve().parents[2] / "examples" / "penguins"
PENGUINS_DOCUMENT = create_app(
    Settings(data_dir=NEVER_STARTED, admin_token=ADMIN_TOKEN, model_project=PENGUINS)
).openapi()
penguins_schema = body_limit_rejects(schemathesis.openapi.from_dict(PENGUINS_DOCUMENT).include(tag="public"))


def fuzzed_app(data_dir: Path, **settings: object) -> Iterator[tuple[asgi.ASGIClient, Path]]:
    """The app under fuzz, on a data directory of its own, reached through schemathesis' own ASGI client (entered,
    it runs the app's lifespan). A session of another kind makes schemathesis call the schema's app instead."""
    with asgi.get_client(create_app(Settings(data_dir=data_dir, admin_token=ADMIN_TOKEN, **settings))) as session:
        yield session, data_dir
    asgi.shutdown_lifespans()  # the log is flushed and closed before pytest removes the directory


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asgi.ASGIClient, Path]]:
    yield from fuzzed_app(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def isolated_penguins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asgi.ASGIClient, Path]]:
    yield from fuzzed_app(tmp_path_factory.mktemp("fuzz-penguins"), model_project=PENGUINS)


@schema.parametrize()
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_public_routes_never_fail_and_keep_their_contract(
    case: schemathesis.Case, isolated: tuple[asgi.ASGIClient, Path]
) -> None:
    # Not checked: "schema-valid data is accepted". Rules the schema cannot express (exactly one of features or
    # prediction_id, a known prediction_id) legitimately answer 422.
    case.call_and_validate(session=isolated[0], excluded_checks=[positive_data_acceptance])


@penguins_schema.parametrize()
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_classifiers_public_routes_never_fail_and_keep_their_contract(
    case: schemathesis.Case, isolated_penguins: tuple[asgi.ASGIClient, Path]
) -> None:
    case.call_and_validate(session=isolated_penguins[0], excluded_checks=[positive_data_acceptance])


def logged_predictions(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "predictions.sqlite3") as db:
        return db.execute("select count(*) from predictions").fetchone()[0]


def test_the_fuzz_reaches_the_isolated_app(isolated: tuple[asgi.ASGIClient, Path]) -> None:
    """A call made the way the fuzz makes them lands in the fixture's prediction log (written in the background),
    and the schema's own app is never started."""
    session, data_dir = isolated
    before = logged_predictions(data_dir) if (data_dir / "predictions.sqlite3").exists() else 0
    response = schema["/predict"]["POST"].Case(body={"features": record()}).call(session=session)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 30
    while logged_predictions(data_dir) == before:
        assert time.monotonic() < deadline, "the fuzz's request never reached the isolated app's log"
        time.sleep(0.05)
    assert not NEVER_STARTED.exists()
