"""Suite-wide test setup: make `tests.support` importable from every test directory."""

from __future__ import annotations

import sys
from pathlib import Path

# The editable install maps only egressgw, feeds and siem; the shared test helpers live in
# tests/support and are imported as `tests.support`, so the repository root must be on the path.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
