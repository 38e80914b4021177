"""Error classes, and the policy for each.

Every error the user can cause is a ``Prune2TVMError``: the CLI prints its message as one
line and exits with status 2 (a traceback only with ``--debug``). Anything else escaping is
a bug in prune2tvm and exits with status 1.
"""


class Prune2TVMError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(Prune2TVMError):
    """A pipeline or target file (or an option standing in for one) is invalid."""


class InputError(Prune2TVMError):
    """A file or option given on the command line cannot be used."""


class OutputExistsError(Prune2TVMError):
    """Results exist where we would write; ``--force`` replaces them."""


class BuildError(Prune2TVMError):
    """TVM or a device compiler could not build the model for the target."""


class NumericalMismatchError(Prune2TVMError):
    """A compiled or exported model disagrees with its reference beyond the tolerance.

    Policy: the result is not written (an artifact is never produced from a wrong build).
    """


class UnsupportedError(Prune2TVMError):
    """The request is valid but cannot be served here (wrong machine, later feature)."""
