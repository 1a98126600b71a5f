"""`make test`: two pytest processes at once. The tests on a Docker engine (marked stack or standin) run in one lane,
in order (they share stacks, stand-ins and the engine's swarm mode); everything else runs meanwhile in the other,
while the first lane mostly waits on rollouts, boots and image builds. The second lane's report is printed after
the first's; the exit code is the worse of the two.

(pytest-xdist's --dist loadgroup would do this in one process, but under pytest 9.2 it ignores the groups:
pytest-dev/pytest-xdist#1386.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ENGINE = "stack or standin"


def main(arguments: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", *arguments]
    with tempfile.TemporaryDirectory(prefix="mlapi-lanes-") as scratch:
        root = Path(scratch)
        report = root / "rest.log"
        with report.open("w") as log:
            rest = subprocess.Popen(
                [*pytest, "-m", f"not ({ENGINE})", "--basetemp", str(root / "rest"), "-p", "no:cacheprovider"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                engine = subprocess.run([*pytest, "-m", ENGINE, "--basetemp", str(root / "engine")], check=False)
            finally:
                rest.wait()
        print("\n===== the other lane: unit and program tests (run at the same time) =====", flush=True)
        sys.stdout.write(report.read_text())
    return max(engine.returncode, rest.returncode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
