"""lorakit's one exception type: every error a user can cause says what was wrong and how to fix it."""


class LorakitError(ValueError):
    """Bad input to lorakit: a config value, a target pattern, an adapter file, a call out of order.

    A subclass of ValueError so that code catching ValueError keeps working.
    """
