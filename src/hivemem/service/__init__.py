"""The HTTP service: a thin FastAPI skin over a LocalHive."""

from hivemem.service.app import create_app

__all__ = ["create_app"]
