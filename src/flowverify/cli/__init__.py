"""The ``flowverify`` command: subcommands ``certify``, ``attack``, ``report``,
``reproduce``, ``demo`` and ``distance`` (:mod:`.app`, one module per subcommand).
"""

from flowverify.cli.app import main

__all__ = ["main"]
