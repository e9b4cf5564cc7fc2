"""The one error type of the model core.

Every problem with a model directory or an input raises `ModelError` with a message that
names the file, field or token at fault and says what to fix; services map it to
INVALID_ARGUMENT (bad input) or to a failed base registration.
"""


class ModelError(ValueError):
    """A model directory or a model input that cannot be used; the message says why."""
