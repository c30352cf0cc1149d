"""The ``flowverify`` command: subcommands ``certify``, ``attack``, ``report``,
``reproduce``, ``demo`` and ``distance``.

:mod:`.app` holds the entry point :func:`main` and the ``demo`` and ``distance``
subcommands; each other subcommand has a module of its own (``certify_cmd``,
``attack_cmd``, ``report_cmd``, ``reproduce_cmd``: its parser and its run).  The options
of ``certify`` and ``attack`` are declared once each (:mod:`.certify_options`,
:mod:`.attack_options`, with :mod:`.shared_options` and :mod:`.runner_options`) in the
schema of :mod:`.options`, from which come their flags, library keywords and recorded
config; :mod:`.common` holds the helpers both use and :mod:`.adversarial_store` the
``attack --save-adversarial`` file.
"""

from flowverify.cli.app import main

__all__ = ["main"]
