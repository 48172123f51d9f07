"""Stage packages that are also functions: ``lexica.harvest(...)`` runs a harvest, and
``lexica.harvest.pool`` is still the package's module.

A package attribute and a sub-package cannot share a name (importing the sub-package replaces the
attribute), so each stage package makes itself callable instead; Python supports replacing a
module's class with a ``ModuleType`` subclass for exactly this kind of customisation.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def make_callable(module_name: str, function: Callable) -> None:
    """Calling the module ``module_name`` calls ``function`` (whose docstring it shows)."""

    class CallableStage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    CallableStage.__call__.__doc__ = function.__doc__
    sys.modules[module_name].__class__ = CallableStage
