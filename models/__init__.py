"""Shared model code: backbones, prompted encoders, heads, class vectors and the bundle format.

``models`` imports neither ``training`` nor ``service``; both import it.
"""

from importlib.metadata import PackageNotFoundError, version

from models import _compat  # noqa: F401  (torchvision shim before anything imports open_clip)

try:
    __version__ = version("promptdistill")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"
