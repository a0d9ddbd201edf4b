"""REST classification service: ``create_app(settings)`` and ``promptdistill serve``.

Imports ``models`` only (never ``training``); a bundle folder is all it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    from service.app import create_app as _create

    return _create(settings)


def __getattr__(name: str) -> Any:
    if name == "Settings":
        from service.settings import Settings

        return Settings
    raise AttributeError(name)
