"""The one base class of errors that are the user's input, not a bug: a bad config, a missing
or damaged checkpoint file, a tensor that does not fit, a layout that cannot be built, an
output path that is taken. The ``mbridge`` command prints their message on one line and exits
with status 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class MBridgeError(Exception):
    """Bad input: the message names the file, tensor, field or option, and what was expected."""


class LayoutError(MBridgeError, ValueError):
    """A parallel layout is malformed or does not fit the world or the model."""
