"""Deprecated: the federation's wire codecs moved to ``protofuse.protocol.federation``; this name
goes in a later release."""

import warnings

from protofuse.protocol.federation import *  # noqa: F403 - the whole public surface, unchanged
from protofuse.protocol.federation import FORMAT_VERSION, WireError  # noqa: F401

warnings.warn(
    "protofuse.wire moved to protofuse.protocol.federation", DeprecationWarning, stacklevel=2
)
