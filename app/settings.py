"""Service configuration, read from the environment (prefix ``MLAPI_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.estimators import ESTIMATORS

EstimatorName = Literal[tuple(ESTIMATORS)]  # type: ignore[valid-type]  # one entry in app/estimators.py adds one


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLAPI_", extra="ignore")

    data_dir: Path = Field(Path("/data"), description="Registry, prediction log and admin token live here.")
    dataset: str = Field(
        "diabetes",
        description="'diabetes' (bundled with scikit-learn) or a path to a CSV file with a header row.",
    )
    target_column: str = Field("target", description="Target column of a CSV dataset.")
    model_project: Path | None = Field(
        None,
        description="A model project directory (mlapi.toml, its data): the model's name, task, target and feature "
        "schema come from it instead of MLAPI_DATASET and MLAPI_TARGET_COLUMN.",
    )
    estimator: EstimatorName = "ridge"
    seed: int = Field(42, description="Seed of model fitting (reproducible training).")
    holdout_seed: int | None = Field(
        None,
        description="Seed of the holdout split. Unset: random per installation, kept in data_dir/holdout-seed, so "
        "nobody can tell from the public code and data which rows judge a candidate.",
    )
    max_observation_ratio: float = Field(
        1.0,
        gt=0,
        description="A retrain uses at most this many observations per development row (the newest ones): a burst "
        "of observations cannot outweigh the base data.",
    )
    confidence_levels: list[float] = Field(
        [0.5, 0.8, 0.9, 0.95], description="Interval levels the conformal model is calibrated for."
    )
    default_confidence: float = 0.9
    max_batch_rows: int = Field(10_000, ge=1)
    max_coalesced_rows: int = Field(
        256, ge=1, le=10_000, description="At most this many concurrent /predict rows share one model call."
    )
    max_observations_per_call: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Larger request bodies get a 413 before they are read or parsed."
    )
    input_range_multiple: float = Field(
        100.0,
        ge=1.0,
        description="Features and targets are accepted within the training range widened by this many ranges on "
        "each side; beyond it a 422 names the field (far outside, a model gives no meaningful or finite answer).",
    )
    promotion_margin: float = Field(
        0.0, ge=0.0, lt=1.0, description="A candidate must cut holdout RMSE by at least this fraction."
    )
    ood_z_threshold: float = Field(4.0, gt=0)
    ood_range_tolerance: float = Field(0.1, ge=0, description="Fraction of the training range allowed beyond it.")
    admin_token: SecretStr | None = Field(None, description="Bearer token of /admin (prefer admin_token_file).")
    admin_token_file: Path | None = Field(
        None, description="File holding the bearer token of /admin (a swarm secret); generated into data_dir if unset."
    )
    ingest_token: SecretStr | None = Field(
        None, description="Bearer token of POST /observations (prefer ingest_token_file); separate from the admin one."
    )
    ingest_token_file: Path | None = Field(
        None, description="File holding the ingest token (a swarm secret); generated into data_dir if unset."
    )
    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL for the prediction log and observations (postgresql://user:password@host/db; prefer "
        "database_url_file). Unset: SQLite in data_dir, for replicas on one node.",
    )
    database_url_file: Path | None = Field(
        None, description="File holding database_url (a swarm secret): every node's replicas write to one store."
    )
    database_wait_s: float = Field(60.0, ge=0, description="How long start-up waits for PostgreSQL to answer.")
    seed_marker: Path | None = Field(
        None,
        description="With the shared registry (PostgreSQL): only a replica that finds this file creates the first "
        "version (importing this node's file registry, else training one); the others wait for it. Unset: any may.",
    )
    peers: str | None = Field(
        None,
        description="host:port of the service's replicas (in a swarm: tasks.<service>:<port>, every task's address). "
        "During a project switch a prediction this replica refuses (422, V2 400/404) is answered by a replica of the "
        "other generation (app/handover.py). Unset: refused here, as always.",
    )
    first_version_dir: Path | None = Field(
        None,
        description="Registries trained when the image was built (`python -m app train --into`): an empty registry "
        "starts from the version there for its data instead of training in the serving process.",
    )
    retrain_isolation: bool = Field(
        True,
        description="Train a retrain's candidate in a process of its own, bounded by retrain_memory_mb and "
        "retrain_timeout_s: a training that fails or runs out of bounds leaves the serving process answering.",
    )
    retrain_timeout_s: float = Field(1800.0, gt=0, description="A retrain's training is stopped after this long.")
    retrain_memory_mb: int | None = Field(
        None,
        ge=64,
        description="A retrain's training process is stopped above this resident memory. Unset: 60 % of the "
        "container's memory limit, none where there is no limit.",
    )
    log_retention_days: float = Field(90.0, gt=0, description="Predictions older than this are deleted.")
    log_max_rows: int = Field(2_000_000, ge=1000, description="At most this many predictions are kept (newest).")
    min_free_mb: int = Field(
        256,
        ge=0,
        description="Free space kept on the data volume: below it, prediction records are dropped (counted) and "
        "observations refused with a 507, so model saves and certificate renewals still fit.",
    )
    log_queue_mb: int = Field(
        32,
        ge=1,
        description="Memory the prediction log's queue may hold for the writer (10,000-row calls of 10 features: "
        "~15; single rows: ~27,000); it absorbs the writer's pauses (a checkpoint, a retention pass); beyond it a "
        "call's rows drop (counted).",
    )
    log_wait_s: float = Field(
        2.0,
        ge=0,
        description="How long a batch call waits for room in the prediction log's queue before its rows drop "
        "(single rows never wait).",
    )
    reload_interval_s: float = Field(
        2.0, gt=0, description="How often a replica checks the registry's current pointer (promotions, rollbacks)."
    )
    drift_interval_s: float = Field(
        300.0, gt=0, description="How often a replica recomputes the drift gauges (mlapi_feature_psi) for alerting."
    )
    drift_window: int = Field(1000, ge=10, description="How many recent predictions the drift gauges compare.")
    drain_seconds: float = Field(
        6.0, ge=0, description="After SIGTERM, keep serving (health answers 503) this long before shutting down."
    )
    graceful_timeout_s: int = Field(10, ge=1, description="Then wait at most this long for in-flight requests.")
    # Above the proxy's idle timeout for backend connections (infra/spec/stack.py), so the proxy closes them first.
    keep_alive_s: int = Field(75, ge=1)
    process_limit: int | None = Field(
        None,
        ge=64,
        description="RLIMIT_NPROC set at start for this user: every process and thread of the model's user on the "
        "node together (all replicas). A fork bomb stops there instead of exhausting the host.",
    )
    host: str = "0.0.0.0"  # noqa: S104 (inside the container; only Traefik reaches it, over the internal network)
    port: int = 8000

    @field_validator("confidence_levels")
    @classmethod
    def _levels_in_range(cls, levels: list[float]) -> list[float]:
        if not levels or any(not 0 < level < 1 for level in levels):
            raise ValueError("every confidence level must be strictly between 0 and 1")
        return sorted(set(levels))

    @field_validator("default_confidence")
    @classmethod
    def _default_in_open_interval(cls, level: float) -> float:
        if not 0 < level < 1:
            raise ValueError("default_confidence must be strictly between 0 and 1")
        return level

    @model_validator(mode="after")
    def _default_is_calibrated(self) -> Settings:
        if self.default_confidence not in self.confidence_levels:
            raise ValueError(
                f"MLAPI_DEFAULT_CONFIDENCE={self.default_confidence} must be one of "
                f"MLAPI_CONFIDENCE_LEVELS={self.confidence_levels}"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
