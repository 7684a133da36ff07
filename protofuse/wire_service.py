"""Deprecated: the adaptation service's wire codecs moved to ``protofuse.protocol.service``; this
name goes in a later release."""

import warnings

from protofuse.protocol.service import *  # noqa: F403 - the whole public surface, unchanged

warnings.warn(
    "protofuse.wire_service moved to protofuse.protocol.service", DeprecationWarning, stacklevel=2
)
