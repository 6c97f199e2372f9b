"""The one base class of every error caused by what a user handed finemoe.

A bad config, data file, checkpoint or model file raises a subclass of ``InputError``
whose message names the culprit (the field, the file, the byte offset). The command
line prints that message as one line and exits with status 2; library callers catch
``InputError`` (or ``ValueError``) to handle all of them at once.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input; the message names what is wrong and where."""
