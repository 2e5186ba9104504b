"""``python -m egressgw``."""

import sys

from egressgw.cli import main

sys.exit(main())
