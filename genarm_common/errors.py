"""The project's setup error: a configuration problem, one line per problem for the user."""

from __future__ import annotations


class SetupError(ValueError):
    """Configuration problems found at start-up; its message is one line per problem."""
