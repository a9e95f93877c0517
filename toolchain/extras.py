"""Optional dependencies (the ``pyproject.toml`` extras), imported only where a feature needs them.

The core (calibrate, export, build, eval, upscale) imports without them; ``2dq-report``'s figures
need matplotlib (extra ``report``) and the Polygraphy comparators need polygraphy (extra
``polygraphy``). :func:`import_extra` imports such a module at the point of use and, when it is
missing, says which feature needs it and how to install it.
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError, RuntimeError):
    """An optional package a feature needs is not installed.

    Also a ``RuntimeError``, so the command lines report it as a failure (exit 1) with its message.
    """


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``; if its package is missing, :class:`MissingExtraError`.

    The message names ``feature`` and the extra: ``"<feature> needs <package>: pip install '2dq[<extra>]'"``.
    An ImportError raised inside an installed package (a broken install) is not masked.

    >>> import_extra("json.decoder", "report", "2dq-report").__name__
    'json.decoder'
    >>> import_extra("no_such_package_2dq.figure", "report", "2dq-report")
    Traceback (most recent call last):
    ...
    toolchain.extras.MissingExtraError: 2dq-report needs no_such_package_2dq: pip install '2dq[report]'
    """
    package = module.split(".")[0]
    try:
        # the package first: a submodule imported earlier stays in sys.modules even if the package is gone
        importlib.import_module(package)
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] != package:
            raise
        raise MissingExtraError(f"{feature} needs {package}: pip install '2dq[{extra}]'", name=package) from err
