"""The project's one exception type.

Every error a user can cause ends up as a :class:`CvtDeployError`: a sentence that names the
bad value and one that says how to fix it. The CLIs print these without a traceback.
"""
from __future__ import annotations


class CvtDeployError(Exception):
    """A problem the user can fix; ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class MissingDependencyError(CvtDeployError, ImportError):
    """An optional extra is not installed."""


def require(module: str, extra: str, feature: str) -> None:
    """Fail with the pip extra to install when ``module`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{feature} needs the Python package '{module}', which is not installed.",
            f"pip install 'cvt-deploy[{extra}]'",
        )


class NotRightHere(CvtDeployError):
    """This machine cannot run a path right (a CPU feature it lacks): the path is refused here,
    never run with wrong results, and checks and choices pass over it, saying why."""
