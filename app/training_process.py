"""A retrain's candidate is trained in a process of its own: a training that needs more memory or time than allowed,
or that crashes, is stopped alone, and the serving process keeps answering with the current model.

The child is a fresh interpreter (multiprocessing's spawn: no thread, lock or database connection of the serving
process is copied into it). It gets the rows as arguments and hands the fitted candidate back as a skops file, which
the service loads as it loads any stored version: only if every type in it is trusted. It volunteers to be the first
process the kernel kills when the container runs out of memory (oom_score_adj 1000), so the server survives even a
spike the memory bound's sampling misses."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import signal
import sys
import tempfile
import time
from pathlib import Path

import skops.io as sio

from app.data import Dataset
from app.metrics import MEMORY_LIMIT_FILES, first_number
from app.model import ModelMetadata, Predictor
from app.registry import MODEL_FILE, load_verified
from app.settings import Settings
from app.training import train_version

SAMPLE_S = 0.1  # how often the child's memory is read
DEFAULT_MEMORY_SHARE = 0.6  # of the container's limit, when MLAPI_RETRAIN_MEMORY_MB is unset: the rest serves
METADATA_FILE = "metadata.json"
ERROR_FILE = "error.txt"


class TrainingFailed(RuntimeError):
    """The candidate's process failed, ran out of its bounds or was killed; the message says which."""


def memory_bound_mb(configured: int | None) -> int | None:
    """MLAPI_RETRAIN_MEMORY_MB, else a share of the container's memory limit, else no bound (a laptop)."""
    if configured is not None:
        return configured
    limit = first_number(MEMORY_LIMIT_FILES)
    return None if limit is None else int(limit / 2**20 * DEFAULT_MEMORY_SHARE)


def resident_mb(pid: int) -> int:
    """The process's resident memory (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def train_in_child(
    settings: Settings, dataset: Dataset, development: Dataset, holdout: Dataset, n_observations: int
) -> Predictor:
    """app.training.train_version, run in a child process bounded by MLAPI_RETRAIN_MEMORY_MB and
    MLAPI_RETRAIN_TIMEOUT_S; TrainingFailed says why it produced no candidate."""
    memory_mb = memory_bound_mb(settings.retrain_memory_mb)
    work = settings.data_dir / "candidates"  # on the volume: the container's /tmp is a small tmpfs
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="candidate-") as scratch:
        out = Path(scratch)
        process = multiprocessing.get_context("spawn").Process(
            target=_train_and_write,
            args=(settings, dataset, development, holdout, n_observations, str(out)),
            name="mlapi-candidate",
            daemon=True,
        )
        process.start()
        _watch(process, memory_mb, settings.retrain_timeout_s)
        if process.exitcode == -signal.SIGKILL:
            raise TrainingFailed(
                "the training process was killed (SIGKILL), most likely by the kernel: the container ran out of "
                "memory, and the training goes first; set MLAPI_RETRAIN_MEMORY_MB below the container's limit"
            )
        if process.exitcode != 0:
            error = out / ERROR_FILE
            raise TrainingFailed(error.read_text() if error.is_file() else f"exit code {process.exitcode}")
        metadata = ModelMetadata.model_validate_json((out / METADATA_FILE).read_text())
        return load_verified("candidate", metadata, (out / MODEL_FILE).read_bytes(), dataset.trusted_types)


def _watch(process: multiprocessing.process.BaseProcess, memory_mb: int | None, timeout_s: float) -> None:
    """Wait for the child; kill it when it passes its memory bound or its time."""
    deadline = time.monotonic() + timeout_s
    try:
        while process.exitcode is None:
            process.join(SAMPLE_S)
            if process.exitcode is not None:
                return
            used = resident_mb(process.pid)
            if memory_mb is not None and used > memory_mb:
                raise TrainingFailed(
                    f"the training process used {used} MB, more than MLAPI_RETRAIN_MEMORY_MB allows ({memory_mb} MB): "
                    "it was stopped"
                )
            if time.monotonic() > deadline:
                raise TrainingFailed(
                    f"training took longer than MLAPI_RETRAIN_TIMEOUT_S ({timeout_s:g} s): it was stopped"
                )
    finally:
        if process.exitcode is None:
            process.kill()
            process.join()


def _train_and_write(
    settings: Settings, dataset: Dataset, development: Dataset, holdout: Dataset, n_observations: int, out: str
) -> None:
    """The child: train, and write the candidate (or the error) where the parent reads it."""
    with contextlib.suppress(OSError):  # not Linux: no such file
        Path("/proc/self/oom_score_adj").write_text("1000")
    directory = Path(out)
    try:
        predictor = train_version(settings, dataset, development, holdout, n_observations)
    except Exception as exc:  # the parent reports it as the retrain's outcome
        (directory / ERROR_FILE).write_text(f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    blob = sio.dumps(predictor.conformal)
    metadata = predictor.metadata.model_copy(update={"sha256": hashlib.sha256(blob).hexdigest()})
    (directory / MODEL_FILE).write_bytes(blob)
    (directory / METADATA_FILE).write_text(metadata.model_dump_json())
