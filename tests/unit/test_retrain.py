"""Retrain → evaluate on the fixed holdout → promote only if better; reject, fail, roll back, hot swap."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from fastapi.testclient import TestClient
from sklearn.preprocessing import FunctionTransformer

import app.training
from tests.support.service import (
    BASE_ROWS,
    FEATURES,
    FRESH_ROWS,
    admin_headers,
    fresh_observations,
    ingest_headers,
    metric_value,
    write_csv,
)


@pytest.fixture
def small_base(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "base.csv", BASE_ROWS)


@pytest.fixture
def make_client(make_client):
    """Gradient boosting: unlike ridge (saturated at ~100 rows here), it measurably gains from more real data. These
    scenarios grow a small base with more real rows than it has: allowed explicitly (max_observation_ratio)."""
    return lambda **settings: make_client(
        **{"estimator": "hist_gradient_boosting", "max_observation_ratio": 10.0, **settings}
    )


def retrain(client: TestClient) -> dict:
    response = client.post("/admin/retrain", headers=admin_headers())
    assert response.status_code == 200, response.text
    return response.json()


def test_more_real_data_is_promoted(make_client, small_base: Path) -> None:
    client = make_client(dataset=str(small_base))
    before = client.get("/model").json()
    stored = client.post(
        "/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)}
    )
    assert stored.status_code == 201

    outcome = retrain(client)

    assert outcome["outcome"] == "promoted", outcome["reason"]
    assert outcome["candidate_version"] == outcome["current_version"] == "v0002"
    assert outcome["candidate_metrics"]["rmse"] < outcome["current_metrics"]["rmse"]
    after = client.get("/model").json()
    assert after["version"] == "v0002" and after["parent"] == "v0001"
    assert after["n_observations"] == len(FRESH_ROWS)
    assert after["n_holdout"] == before["n_holdout"]  # judged on the same rows
    assert after["data_fingerprint"] != before["data_fingerprint"]
    assert (
        client.post("/predict", json={"features": fresh_observations([0])[0]["features"]}).json()["model_version"]
        == "v0002"
    )
    text = client.get("/metrics").text
    assert metric_value(text, "mlapi_retrains_total", outcome="promoted") == 1.0
    assert metric_value(text, "mlapi_last_retrain_promoted") == 1.0
    assert metric_value(text, "mlapi_model_info", version="v0002", estimator="hist_gradient_boosting") == 1.0


def test_worse_candidate_is_rejected_and_recorded(make_client, small_base: Path) -> None:
    client = make_client(dataset=str(small_base))
    garbage = fresh_observations(FRESH_ROWS, target_noise=400.0)  # ground truth that is mostly noise
    client.post("/observations", headers=ingest_headers(), json={"observations": garbage})

    outcome = retrain(client)

    assert outcome["outcome"] == "rejected"
    assert "not below" in outcome["reason"]
    assert outcome["candidate_metrics"]["rmse"] >= outcome["current_metrics"]["rmse"]
    assert client.get("/model").json()["version"] == "v0001"
    versions = client.get("/admin/versions", headers=admin_headers()).json()
    assert [v["version"] for v in versions["versions"]] == ["v0001"]
    assert versions["history"][-1]["outcome"] == "rejected"
    assert metric_value(client.get("/metrics").text, "mlapi_last_retrain_promoted") == 0.0


def test_margin_blocks_a_marginal_improvement(make_client, small_base: Path) -> None:
    client = make_client(dataset=str(small_base), promotion_margin=0.9)
    client.post("/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)})
    outcome = retrain(client)
    assert outcome["outcome"] == "rejected"
    assert "margin 0.9" in outcome["reason"]


def test_broken_candidate_fails_and_current_keeps_serving(
    make_client, small_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(dataset=str(small_base))

    def exploding_train(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(app.training, "train", exploding_train)
    response = client.post("/admin/retrain", headers=admin_headers())
    assert response.status_code == 200
    assert response.json()["outcome"] == "failed"
    assert "SVD did not converge" in response.json()["reason"]
    assert client.post("/predict", json={"features": fresh_observations([0])[0]["features"]}).status_code == 200
    assert metric_value(client.get("/metrics").text, "mlapi_retrains_total", outcome="failed") == 1.0


def test_poisoned_rows_stored_before_the_limits_are_quarantined_not_fatal(make_client, small_base: Path) -> None:
    """A finite but huge value (1e308) once stored made every later retrain fail. The API now refuses it (422); rows
    already in a log from before are left out of the fit and counted, and the retrain goes on."""
    client = make_client(dataset=str(small_base))
    huge = fresh_observations(FRESH_ROWS[:50])
    for item in huge:
        item["target"] = 1.7e308
    refused = client.post("/observations", headers=ingest_headers(), json={"observations": huge})
    assert refused.status_code == 422
    service = client.app.state.service
    stored = [(None, list(item["features"].values()), item["target"]) for item in huge]
    stored.append((None, [1e308] * len(FEATURES), 100.0))
    assert service.prediction_log.add_observations(stored) == 51
    client.post("/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)})
    outcome = retrain(client)
    assert outcome["outcome"] == "promoted", outcome["reason"]
    assert outcome["quarantined"] == 51 and outcome["n_observations"] == len(FRESH_ROWS)


def test_the_holdout_is_random_per_installation_and_kept(make_client, tmp_path: Path) -> None:
    holdouts = []
    for name in ("one", "two"):
        client = make_client(data_dir=tmp_path / name, holdout_seed=None)
        seed_file = tmp_path / name / "holdout-seed"
        assert oct(seed_file.stat().st_mode & 0o777) == "0o600"
        holdouts.append(client.app.state.service._splits()[1])
        client.__exit__(None, None, None)
        again = make_client(data_dir=tmp_path / name, holdout_seed=None)  # a restart keeps the installation's split
        assert np.array_equal(again.app.state.service._splits()[1].X, holdouts[-1].X)
        again.__exit__(None, None, None)
    assert not np.array_equal(holdouts[0].X, holdouts[1].X)  # nobody can tell from code and data which rows judge


def test_holdout_rows_sent_as_observations_never_reach_the_fit(make_client, tmp_path: Path) -> None:
    """The bundled data is public: an attacker who sends every row as an observation must not get a candidate that
    learned the holdout (a faked better score)."""
    client = make_client(holdout_seed=None, max_observation_ratio=10.0)
    n_holdout = len(client.app.state.service._splits()[1])
    everything = fresh_observations(list(range(442)))
    for item in everything[::2]:  # nudged in the last digits: still the same rows
        item["features"] = {name: value * (1 + 1e-7) for name, value in item["features"].items()}
    assert client.post("/observations", headers=ingest_headers(), json={"observations": everything}).status_code == 201
    outcome = retrain(client)
    assert outcome["quarantined"] == n_holdout
    assert outcome["n_observations"] == 442 - n_holdout


def test_observations_cannot_outweigh_the_base_data_by_default(make_client, small_base: Path) -> None:
    client = make_client(dataset=str(small_base), max_observation_ratio=1.0)  # the default
    n_development = len(BASE_ROWS) - len(client.app.state.service._splits()[1])
    client.post("/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)})
    assert retrain(client)["n_observations"] == n_development  # the newest ones, as many as the base has


def test_rollback_and_refusals(make_client, small_base: Path, tmp_path: Path) -> None:
    client = make_client(dataset=str(small_base))
    client.post("/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)})
    assert retrain(client)["outcome"] == "promoted"

    rolled = client.post("/admin/rollback", json={"version": "v0001"}, headers=admin_headers())
    assert rolled.json() == {"current": "v0001"}
    assert client.get("/model").json()["version"] == "v0001"
    assert (tmp_path / "data" / "models" / "CURRENT").read_text().strip() == "v0001"

    missing = client.post("/admin/rollback", json={"version": "v0099"}, headers=admin_headers())
    assert missing.status_code == 409 and "does not exist" in missing.text

    # A flipped byte: refused by its hash before skops parses it.
    model_file = tmp_path / "data" / "models" / "v0002" / "model.skops"
    original = model_file.read_bytes()
    model_file.write_bytes(original[:-10] + bytes(10))
    tampered = client.post("/admin/rollback", json={"version": "v0002"}, headers=admin_headers())
    assert tampered.status_code == 409 and "sha256" in tampered.text
    assert client.get("/model").json()["version"] == "v0001"


def test_untrusted_type_is_refused_even_with_a_matching_hash(make_client, small_base: Path, tmp_path: Path) -> None:
    client = make_client(dataset=str(small_base))
    client.post("/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)})
    assert retrain(client)["outcome"] == "promoted"
    version_dir = tmp_path / "data" / "models" / "v0001"
    # An attacker who can write the volume swaps in an object that would call os.system, and fixes the hash.
    import hashlib
    import os

    evil = sio.dumps(FunctionTransformer(func=os.system))
    (version_dir / "model.skops").write_bytes(evil)
    metadata = json.loads((version_dir / "metadata.json").read_text())
    metadata["sha256"] = hashlib.sha256(evil).hexdigest()
    (version_dir / "metadata.json").write_text(json.dumps(metadata))

    refused = client.post("/admin/rollback", json={"version": "v0001"}, headers=admin_headers())
    assert refused.status_code == 409
    assert "untrusted types" in refused.text and "system" in refused.text
    assert client.get("/model").json()["version"] == "v0002"


def test_restart_with_tampered_current_is_not_ready_then_recovers(make_client, tmp_path: Path, caplog) -> None:
    client = make_client()
    client.__exit__(None, None, None)
    model_file = tmp_path / "data" / "models" / "v0001" / "model.skops"
    model_file.write_bytes(b"not a model")
    restarted = make_client()
    ready = restarted.get("/ready")
    assert ready.status_code == 503 and ready.json() == {"detail": "not ready"}  # no internals on the internet
    assert "model.skops does not match its recorded sha256" in caplog.text  # the reason is in the log
    refused = restarted.post("/predict", json={"features": fresh_observations([0])[0]["features"]})
    assert refused.status_code == 503 and refused.json() == {"detail": "model not ready"}


def test_hot_swap_under_concurrent_requests(make_client, small_base: Path) -> None:
    client = make_client(dataset=str(small_base))
    client.post("/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)})
    features = fresh_observations([200])[0]["features"]
    # (status, version, prediction, started after the promotion had returned)
    results: list[tuple[int, str | None, float | None, bool]] = []
    promoted = threading.Event()
    requests_after_promotion = 10  # per worker: the swap must be seen, not just survived

    def hammer() -> None:
        after = 0
        while after < requests_after_promotion and len(results) < 20_000:
            started_after = promoted.is_set()
            response = client.post("/predict", json={"features": features})
            body = response.json() if response.status_code == 200 else {}
            results.append((response.status_code, body.get("model_version"), body.get("prediction"), started_after))
            after += started_after

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for worker in workers:
        worker.start()
    outcome = retrain(client)
    promoted.set()
    for worker in workers:
        worker.join(timeout=60)

    assert outcome["outcome"] == "promoted"
    assert {status for status, *_ in results} == {200}
    seen = Counter(version for _, version, _, _ in results)
    assert set(seen) <= {"v0001", "v0002"}
    after = [version for _, version, _, started_after in results if started_after]
    assert len(after) >= 4 * requests_after_promotion
    assert set(after) == {"v0002"}, "a request that starts after the promotion returned is served by it"
    # Each answer is exactly what the version it names computes: no request was served by a half-swapped model.
    registry = client.app.state.service.registry
    X = np.array([[features[name] for name in FEATURES]])
    expected = {version: float(registry.load(version).point(X)[0]) for version in seen}
    for _, version, prediction, _ in results:
        assert prediction == pytest.approx(expected[version], rel=1e-12)
    assert expected["v0001"] != pytest.approx(expected["v0002"], rel=1e-6)


def test_concurrent_retrain_is_refused(make_client, small_base: Path) -> None:
    """Another replica on the same volume holds the registry lock: this one answers 409, not a second retrain."""
    client = make_client(dataset=str(small_base))
    other_replica = make_client(dataset=str(small_base)).app.state.service
    with other_replica.registry.lock(blocking=False):
        busy = client.post("/admin/retrain", headers=admin_headers())
    assert busy.status_code == 409 and "already running" in busy.text
    assert client.post("/admin/retrain", headers=admin_headers()).status_code == 200  # released: it runs


def test_a_retrain_streams_its_phases_then_its_outcome(make_client, small_base: Path) -> None:
    """What `mlapi retrain` shows: each phase as it happens, then the same outcome the plain call answers."""
    client = make_client(dataset=str(small_base))
    client.post("/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)})
    response = client.post("/admin/retrain?progress=true", headers=admin_headers())
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    phases = [line["phase"] for line in lines[:-1]]
    assert phases[0] == "reading the project's data and the observations"
    assert phases[1].startswith("training a candidate on ") and f"and {len(FRESH_ROWS)} observations" in phases[1]
    assert phases[2].startswith("candidate holdout RMSE ") and phases[2].endswith("judging it against v0001")
    assert phases[3:] == ["saving and promoting the candidate"]
    assert lines[-1]["outcome"] == "promoted" and lines[-1]["current_version"] == "v0002"
    # Another replica retraining: the stream's one line says so (the CLI turns it into exit 1).
    other_replica = make_client(dataset=str(small_base)).app.state.service
    with other_replica.registry.lock(blocking=False):
        busy = client.post("/admin/retrain?progress=true", headers=admin_headers())
    [said] = [json.loads(line) for line in busy.text.splitlines()]
    assert said["status"] == 409 and "already running" in said["error"]


def test_cli_retrain_talks_to_the_private_route(
    make_client, small_base: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`python -m app retrain` (what host cron runs) reaches /admin/retrain with the token from the data dir."""
    import uvicorn

    from app.__main__ import main
    from app.main import create_app
    from app.settings import Settings, get_settings

    settings = Settings(data_dir=tmp_path / "data", dataset=str(small_base), port=18765, host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=18765, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        monkeypatch.setenv("MLAPI_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("MLAPI_PORT", "18765")
        monkeypatch.delenv("MLAPI_ADMIN_TOKEN", raising=False)
        get_settings.cache_clear()
        assert main(["retrain"]) == 0
        said = capsys.readouterr()
        assert '"outcome"' in said.out and "retrain [" in said.err and "training a candidate" in said.err
        assert main(["versions"]) == 0
        monkeypatch.setenv("MLAPI_ADMIN_TOKEN", "a-wrong-but-long-enough-token")
        get_settings.cache_clear()
        assert main(["retrain"]) == 1
    finally:
        get_settings.cache_clear()
        server.should_exit = True
        thread.join(timeout=10)
