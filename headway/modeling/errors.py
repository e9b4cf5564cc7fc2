"""The model core's error type, `headway.errors.ModelError`, re-exported here.

Every problem with a model directory or an input raises it with a message that names the
file, field or token at fault and says what to fix.
"""

from headway.errors import ModelError

__all__ = ["ModelError"]
