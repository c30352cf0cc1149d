"""``python -m flowverify``: the ``flowverify`` command (:func:`flowverify.cli.app`)."""

import sys

from flowverify.cli.app import main

sys.exit(main())
