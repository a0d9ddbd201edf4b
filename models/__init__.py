"""Shared model code: backbones, prompted encoders, heads, class vectors and the bundle format.

``models`` imports neither ``training`` nor ``service``; both import it.

Importing ``models`` is cheap (no torch): the CLI's client commands import it only to register
their parsers. The torchvision shim (:mod:`models._compat`, which needs torch) is applied by a
meta-path hook the moment anything first imports ``torchvision`` (open_clip, timm), so it still
runs before torchvision in every process that imported ``models``, whatever imports first.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

try:
    __version__ = version("promptdistill")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"


class _ShimBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Finds nothing itself; on the first ``import torchvision`` it applies the shim, then stays idle.

    (It stays in ``sys.meta_path``: removing it while the import system iterates that list would
    make the import skip the next finder.)
    """

    applied = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "torchvision" and not self.applied:
            self.applied = True
            from models import _compat  # noqa: F401  (defines the op schemas torchvision's import needs)
        return None


if "torchvision" in sys.modules:  # already imported (and so already working): nothing to intercept
    from models import _compat  # noqa: F401
elif not any(isinstance(f, _ShimBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _ShimBeforeTorchvision())
