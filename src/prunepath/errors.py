"""The one exception type PrunePath raises for bad input; its message always says how to fix the problem."""


class PrunePathError(ValueError):
    """Bad input or an unsupported setting. The message names the fix."""
