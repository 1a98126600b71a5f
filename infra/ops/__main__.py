"""`python -m infra.ops`: the `mlapi` command (infra/ops/cli.py) without the console script."""

from infra.ops.cli import main

main()
