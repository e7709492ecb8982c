"""The exception types a user can cause; the CLI turns them into one line and exit code 2."""


class SteerStrengthError(Exception):
    """Base class: a problem with the user's input, stated with how to fix it."""


class ModelLoadError(SteerStrengthError):
    """The model spec cannot be resolved or loaded."""


class ArchitectureError(SteerStrengthError):
    """Blocks, final norm or unembedding cannot be located in the model."""


class InputError(SteerStrengthError):
    """A file, size, grid or value given by the user is invalid."""


class RunError(SteerStrengthError):
    """The run directory is locked or inconsistent."""
