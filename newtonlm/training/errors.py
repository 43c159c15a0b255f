"""The trainer's exception for mistakes a user made, as opposed to bugs.

``python -m newtonlm.training.train`` prints a :class:`UserError` (and newtonlm.data's
``DataError``) as one message and exits with code 2; anything else is an internal error and is
printed with its full traceback (exit code 1). Raise it for a configuration value, a path, or a
refused resume, with a message that names the setting and its value, what was expected, and what
to do (e.g. ``train.resume=step_00000200, but ...: add train.overwrite=true or ...``).
"""


class UserError(ValueError):
    """A run refused because of its input (configuration, paths, run directory), not a bug.

    A ValueError, so that code and tests catching ValueError keep working."""
