"""The one exception type users are meant to see.

Anything the user can fix (a bad recipe field, a checkpoint that does not fit, an untraceable
module) is raised as :class:`EfquantError` with a message that names the file and the field.
The CLI prints it as one line and exits with code 2; everything else is a bug (exit code 1).
"""

from __future__ import annotations


class EfquantError(Exception):
    """A problem with the user's input, explained in one line (or one line per problem)."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class RecipeError(EfquantError):
    """A recipe failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class CoverageError(EfquantError):
    """The rewritten graph quantizes fewer layers than the recipe asked for."""
