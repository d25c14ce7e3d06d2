"""`romebatch` with the journal's crash-test seam armed, for tests/test_crash.py only.

ROMEBATCH_FAULT=commit:3 kills this process (SIGKILL) inside its 3rd journal commit: after
the edit row is written, before the transaction commits. romebatch itself never reads the
variable: only this script installs the hook (romebatch/journal.py FAULT_HOOK).
"""

import os
import sys

from romebatch import journal
from romebatch.cli import main

point, _, count = os.environ["ROMEBATCH_FAULT"].partition(":")
target = int(count or 1)
seen = {"n": 0}


def hook(name: str) -> None:
    if name == point:
        seen["n"] += 1
        if seen["n"] == target:
            os.kill(os.getpid(), 9)


journal.FAULT_HOOK = hook
sys.argv[0] = "romebatch"
main()
