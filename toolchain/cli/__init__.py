"""Command-line plumbing shared by the seven ``2dq-*`` tools (:mod:`toolchain.cli.common`: logging flags,
``--json PATH``, usage errors and exit codes) and ``2dq-eval`` (:mod:`toolchain.cli.eval`).

Command-line modules wire the layers together: unlike the rest of :mod:`toolchain`, they may import from
every 2dq package (``tests/test_layers.py``). Library code takes only :class:`~toolchain.cli.common.UsageError` from
here (to name an option in an error), never the tools.
"""
