"""``python -m flowverify.cli``."""

import sys

from flowverify.cli.app import main

sys.exit(main())
