"""``python -m infra.config``: the configuration reference (docs/configuration.md is this output)."""

import sys

from infra.config.keys import reference_table

sys.stdout.write(reference_table())
