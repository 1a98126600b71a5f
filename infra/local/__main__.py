"""``python -m infra.local up|down|status|…``: the whole stack on this machine's engine."""

import sys

from infra.local.cli import main

sys.exit(main())
