"""``python -m flowverify``: the ``flowverify`` command (:func:`flowverify.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
