"""Errors a user can act on.

Every error that comes from bad input (an unknown model name, a corrupt file, a malformed data line, an invalid
request) is a `HayaiError` whose message names what is wrong and where. The CLI prints such errors on one line
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HayaiError(Exception):
    """An error caused by input the user can fix."""

    exit_code = 2


class ModelNotFoundError(HayaiError):
    """A model name or path that resolves to nothing."""


class CorruptFileError(HayaiError):
    """A stored file is missing, truncated or fails its checksum."""


class UnsupportedModelError(HayaiError):
    """A checkpoint whose architecture or format hayai cannot run."""


class ContextOverflowError(HayaiError):
    """A prompt (plus the requested new tokens) that does not fit the model's context window."""


class DataError(HayaiError):
    """Malformed training or evaluation data; the message names the file and line."""


class ConfigError(HayaiError):
    """An invalid option or combination of options."""
