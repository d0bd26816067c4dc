"""User-facing errors: one line that names the culprit (field, file or model).

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class EvomergeError(Exception):
    """Base class for errors caused by input the user can fix."""


class RecipeError(EvomergeError):
    """A merge recipe (mergekit YAML) is malformed or asks for something impossible."""


class SpaceError(EvomergeError):
    """A search space (space.yaml) is malformed."""


class CheckpointError(EvomergeError):
    """A source model cannot be found, read or trusted."""


class ArchitectureMismatch(CheckpointError):
    """Source models cannot be merged with each other (other architecture, other shapes)."""


class OutputError(EvomergeError):
    """An output location cannot be written without losing something (a source, another file)."""


class MergeFailure(EvomergeError):
    """A recipe was valid but its merge produced unusable weights (NaN/inf, numerical failure)."""


class DoesNotFit(EvomergeError):
    """The memory plan finds no placement: the message names the largest consumer and what would fit."""


class PartialOutput(EvomergeError):
    """The main output was written, one of its extras (a GGUF file) could not be: the message says which."""
