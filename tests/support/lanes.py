"""`make test`: three pytest processes at once. The local stack's tests (`stack`) run in order in one lane, the VM
stand-ins' (`standin`, each with a Docker engine of its own inside its container) in another, everything else in the
third; the first two mostly wait on rollouts, boots and image builds. The stand-in and the other lane's reports are
printed after the stack lane's; the exit code is the worst of the three.

The host engine is put in swarm mode before the lanes start and left after they end (if this run turned it on), so
no `up` or `down` of the local stack switches swarm mode on or off while a stand-in runs: doing so once broke a
stand-in's container DNS for a moment. The shared images are built by one lane at a time (infra/local/images.py).

(pytest-xdist's --dist loadgroup would do this in one process, but under pytest 9.2 it ignores the groups:
pytest-dev/pytest-xdist#1386.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

LANES = {"stand-in": "standin", "other": "not (stack or standin)"}  # besides the stack lane, in the foreground
# The other lane has minutes to spare; on two cores its CPU-bound tests slowed the two that wait on rollouts and
# builds (cold: 12 min instead of 5.5): it yields the CPU to them.
NICE = {"other": 15}


def hold_swarm_mode() -> bool:
    """Swarm mode on for the whole run; True if this call turned it on. Without an engine: nothing (they skip)."""
    try:
        import docker

        from infra.local.engine import ensure_swarm

        return ensure_swarm(docker.from_env(timeout=30))
    except Exception:  # no engine, or it does not answer: the engine lanes say so themselves
        return False


def main(arguments: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", *arguments]
    turned_on = hold_swarm_mode()
    with tempfile.TemporaryDirectory(prefix="mlapi-lanes-") as scratch:
        root = Path(scratch)
        lanes = []
        try:
            for name, marks in LANES.items():
                log = (root / f"{name}.log").open("w")
                niced = ["nice", "-n", str(NICE[name])] if name in NICE else []
                command = [*niced, *pytest, "-m", marks, "--basetemp", str(root / name), "-p", "no:cacheprovider"]
                lanes.append((name, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
            stack = subprocess.run([*pytest, "-m", "stack", "--basetemp", str(root / "stack")], check=False)
        finally:
            for _, log, process in lanes:
                process.wait()
                log.close()
            if turned_on:
                subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True, check=False)
        for name, _, _ in lanes:
            print(f"\n===== the {name} lane (run at the same time) =====", flush=True)
            sys.stdout.write((root / f"{name}.log").read_text())
    return max(stack.returncode, *(process.returncode for _, _, process in lanes))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
