"""Model versions on the data directory: one skops file plus metadata each, and an atomic "current" pointer; the
fixed holdout, its seed, the retrain history, and the lock that makes one writer at a time.

With replicas on several nodes the same interface is served from PostgreSQL (app/pgregistry.py).
Files are loaded with skops and an explicit allow-list of types, never with pickle or joblib: a model file is data
that may have been tampered with, and loading it must not run code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import skops.io as sio

from app.data import Dataset
from app.model import ModelMetadata, Predictor
from app.project import DATA_TYPES

# Types skops does not trust by default but that our estimators and MAPIE's split conformal regressor consist of.
TRUSTED_TYPES: frozenset[str] = frozenset(
    {
        "app.tabular.frame_of_codes",  # the DataFrame step of a typed project's pipeline (app/estimators.py)
        "mapie.classification.SplitConformalClassifier",
        "mapie.classification._MapieClassifier",
        "mapie.conformity_scores.bounds.absolute.AbsoluteConformityScore",
        "mapie.conformity_scores.sets.aps.APSConformityScore",
        "mapie.estimator.classifier.EnsembleClassifier",
        "mapie.estimator.regressor.EnsembleRegressor",
        "mapie.regression.regression.SplitConformalRegressor",
        "mapie.regression.regression._MapieRegressor",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        # A fitted tree's arrays (random_forest): rebuilt from its state, no code. Without it, every random-forest
        # version failed its own load check.
        "sklearn.tree._tree.Tree",
    }
)
TRUSTED_TYPES |= DATA_TYPES
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
MODEL_FILE = "model.skops"
METADATA_FILE = "metadata.json"


class RegistryError(RuntimeError):
    """A version is missing, unreadable or untrusted; the message says which and why."""


class RetrainBusy(RuntimeError):
    """Another writer (a retrain or rollback, in this or another replica) holds the registry lock."""


# One load at a time per process: numpy reads each array's header with ast.literal_eval, and CPython 3.11's AST
# constructor keeps its recursion depth in state shared by threads (python/cpython#106905), so the registry watcher
# and a retrain loading at once failed with "AST constructor recursion depth mismatch" (seen in a test run).
_SKOPS_LOAD = threading.Lock()


def generated_once(path: Path, make: Callable[[], str]) -> str:
    """A value made once, atomically: written to a temporary file and linked into place, so no reader ever sees it
    half-written and two processes starting together agree on one value."""
    if not path.exists():
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # fails if another process made it first: use theirs
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return path.read_text().strip()


def untrusted_types(blob: bytes, trusted: frozenset[str] = frozenset()) -> list[str]:
    """The types in a skops file that neither the service nor the project (``model.trusted_types``) trusts."""
    with _SKOPS_LOAD:
        return sorted(set(sio.get_untrusted_types(data=blob)) - TRUSTED_TYPES - trusted)


def load_verified(
    version: str, metadata: ModelMetadata, blob: bytes, trusted: frozenset[str] = frozenset()
) -> Predictor:
    """A stored model, only if it is the one recorded (sha256) and consists of trusted types only: the service's,
    and the ones the project names as its own (``trusted``)."""
    digest = hashlib.sha256(blob).hexdigest()
    if digest != metadata.sha256:
        raise RegistryError(f"version {version}: {MODEL_FILE} does not match its recorded sha256 (tampered?)")
    with _SKOPS_LOAD:
        try:
            untrusted = set(sio.get_untrusted_types(data=blob))
        except Exception as exc:  # skops raises several types for a malformed archive
            raise RegistryError(f"version {version}: {MODEL_FILE} is not a valid skops file ({exc})") from exc
        unknown = sorted(untrusted - TRUSTED_TYPES - trusted)
        if unknown:
            raise RegistryError(f"version {version}: refusing to load untrusted types {unknown}")
        try:
            conformal = sio.loads(blob, trusted=sorted(untrusted))
        except Exception as exc:
            raise RegistryError(f"version {version}: loading failed ({exc})") from exc
    return Predictor(conformal, metadata)


def new_seed() -> str:
    return str(secrets.randbits(62))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Registry:
    def __init__(self, data_dir: Path, trusted: frozenset[str] = frozenset()) -> None:
        self.data_dir = data_dir
        self.trusted = trusted  # the project's own types (model.trusted_types), beside TRUSTED_TYPES
        self.root = data_dir / "models"
        self.root.mkdir(parents=True, exist_ok=True)
        self.holdout_path = data_dir / "holdout.npz"
        self.pointer = self.root / "CURRENT"
        self.lock_path = data_dir / "registry.lock"
        self.history_path = data_dir / "retrain-history.jsonl"
        self.seed_path = data_dir / "holdout-seed"

    @contextlib.contextmanager
    def lock(self, *, blocking: bool) -> Iterator[None]:
        """One writer of the registry at a time across every replica on the volume (an flock on a shared file).
        Non-blocking callers get RetrainBusy when another replica (or thread) holds it."""
        with open(self.lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                raise RetrainBusy("a retrain or rollback is already running (in this or another replica)") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def holdout_seed(self) -> int:
        """The installation's holdout seed: random, made once, kept (nobody can tell the holdout rows from the code)."""
        return int(generated_once(self.seed_path, new_seed))

    def known_holdout_seed(self) -> int | None:
        """The seed if one was made (or pinned) already, without making one."""
        return int(self.seed_path.read_text().strip()) if self.seed_path.exists() else None

    def append_history(self, record: dict) -> None:
        write_json_line(self.history_path, record)

    def history(self, limit: int) -> list[dict]:
        if not self.history_path.exists():
            return []
        return [json.loads(line) for line in self.history_path.read_text().splitlines()[-limit:]]

    def holdout_bytes(self) -> bytes | None:
        return self.holdout_path.read_bytes() if self.holdout_path.exists() else None

    # -- versions ---------------------------------------------------------------------------------------------
    def version_names(self) -> list[str]:
        names = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        return sorted(names, key=lambda name: int(VERSION_PATTERN.match(name).group(1)))

    def metadata(self, version: str) -> ModelMetadata:
        path = self._version_dir(version) / METADATA_FILE
        try:
            return ModelMetadata.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"version {version}: unreadable metadata ({exc})") from exc

    def list(self) -> list[ModelMetadata]:
        return [self.metadata(name) for name in self.version_names()]

    def save(self, predictor: Predictor, parent: str | None) -> str:
        """Store a new version and return its name; it is not made current here."""
        while True:
            names = self.version_names()
            number = int(VERSION_PATTERN.match(names[-1]).group(1)) + 1 if names else 1
            version = f"v{number:04d}"
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
            blob = sio.dumps(predictor.conformal)
            (staging / MODEL_FILE).write_bytes(blob)
            metadata = predictor.metadata.model_copy(
                update={"version": version, "parent": parent, "sha256": hashlib.sha256(blob).hexdigest()}
            )
            (staging / METADATA_FILE).write_text(metadata.model_dump_json(indent=2))
            try:
                staging.rename(self.root / version)  # atomic; fails if another writer took the name
            except OSError:
                for child in staging.iterdir():
                    child.unlink()
                staging.rmdir()
                continue
            predictor.metadata = metadata
            return version

    def load(self, version: str) -> Predictor:
        metadata = self.metadata(version)
        blob_path = self._version_dir(version) / MODEL_FILE
        try:
            blob = blob_path.read_bytes()
        except OSError as exc:
            raise RegistryError(f"version {version}: cannot read {blob_path} ({exc})") from exc
        return load_verified(version, metadata, blob, self.trusted)

    def model_bytes(self, version: str) -> bytes:
        """The stored file as it is (an import into the shared registry copies it unchanged)."""
        return (self._version_dir(version) / MODEL_FILE).read_bytes()

    # -- current pointer --------------------------------------------------------------------------------------
    def current(self) -> str | None:
        try:
            version = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def set_current(self, version: str) -> None:
        self._version_dir(version)
        _atomic_write(self.pointer, f"{version}\n".encode())

    # -- holdout: fixed once, so every version is judged on the same rows -------------------------------------
    def load_holdout(self, like: Dataset) -> Dataset | None:
        stored = self.holdout_bytes()
        return None if stored is None else holdout_from_bytes(stored, like, str(self.holdout_path))

    def save_holdout(self, holdout: Dataset) -> None:
        _atomic_write(self.holdout_path, holdout_to_bytes(holdout))

    # -- starting from another registry ---------------------------------------------------------------------------
    def import_from(self, source: Registry) -> int:
        """Copy another file registry in (the first version built into the image): every version, byte for byte,
        the holdout and its seed, the history and the current pointer. The caller holds the writer lock and has seen
        that this registry has no current version."""
        names = source.version_names()
        for name in names:
            if (self.root / name).exists():
                continue
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
            for item in (MODEL_FILE, METADATA_FILE):
                shutil.copyfile(source.root / name / item, staging / item)
            staging.rename(self.root / name)
        holdout = source.holdout_bytes()
        if holdout is not None:
            _atomic_write(self.holdout_path, holdout)
        if source.seed_path.exists():
            _atomic_write(self.seed_path, source.seed_path.read_bytes())
        for record in source.history(limit=1_000_000):
            self.append_history(record)
        self.set_current(source.current())
        return len(names)

    def _version_dir(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version):
            raise RegistryError(f"version must look like v0001, got {version!r}")
        path = self.root / version
        if not path.is_dir():
            raise RegistryError(f"version {version} does not exist (known: {self.version_names()})")
        return path


def holdout_to_bytes(holdout: Dataset) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=holdout.X, y=holdout.y, feature_names=np.array(holdout.feature_names))
    return buffer.getvalue()


def holdout_from_bytes(data: bytes, like: Dataset, where: str) -> Dataset:
    """The stored holdout rows, with the schema, name and store of ``like`` (the configured data)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        names = tuple(str(name) for name in stored["feature_names"])
        if names != like.feature_names:
            raise RegistryError(
                f"{where} was made for features {list(names)}, the dataset has {list(like.feature_names)}"
            )
        return replace(like, X=stored["X"], y=stored["y"], times=None)  # the split is made; its order is not kept


def write_json_line(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
