"""Deprecated: the Flower ClientApp moved to ``client_sdk.clientapp.app``; this name goes in a
later release."""

import warnings

from client_sdk.clientapp.app import app

warnings.warn(
    "client_sdk.client_app moved to client_sdk.clientapp.app (ClientApp "
    "'client_sdk.clientapp.app:app')",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["app"]
