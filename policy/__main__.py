"""The policy pack's entry point (`pulumi preview --policy-pack policy`): the rules live in policy/rules.py, plain
functions the tests call without the Pulumi CLI."""

import sys
from pathlib import Path

from pulumi_policy import PolicyPack

sys.path.insert(0, str(Path(__file__).resolve().parent))  # however the analyzer starts us, rules.py is beside us

from rules import POLICIES

PolicyPack(name="mlapi-safety", policies=POLICIES)
