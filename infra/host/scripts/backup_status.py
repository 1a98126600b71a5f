"""The backup job's status file, written as the model's user (the job runs it with setpriv): argv = path, outcome
(success | failure), snapshot count. The service exports the file as Prometheus gauges.

The directory belongs to the replicas, so nothing here follows a link: the old file is opened O_NOFOLLOW and the new
one is created O_EXCL beside it and renamed over it. Standard library only (it runs with the host's python3)."""

import json
import os
import sys
import tempfile
import time


def main(path: str, outcome: str, snapshots: int) -> None:
    try:
        with open(path, opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW)) as handle:
            state = json.load(handle)
        if not isinstance(state, dict):
            state = {}
    except (OSError, ValueError):
        state = {}
    state[f"last_{outcome}_unixtime"] = time.time()
    if outcome == "success":
        state["snapshots"] = snapshots
    descriptor, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))  # O_EXCL
    with os.fdopen(descriptor, "w") as handle:
        json.dump(state, handle)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
