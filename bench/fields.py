"""Validating JSON fields with error messages that name the path of the bad value."""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any


class SchemaError(ValueError):
    """A result document that does not match the schema."""


def _kind(value: Any) -> str:
    """Name a JSON value's type for error messages."""
    return "null" if value is None else type(value).__name__


class Fields:
    """Typed reads from one JSON object; every error names the field path."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise SchemaError(f"{path or 'document'}: expected an object, got {_kind(data)}")
        self.data, self.path, self.seen = data, path, set()

    def at(self, name: str) -> str:
        """Full path of a field of this object."""
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, message: str):
        """Raise a SchemaError for one field."""
        raise SchemaError(f"{self.at(name)}: {message}")

    def get(self, name: str, required: bool = False) -> Any:
        """Raw value of a field; missing means null."""
        self.seen.add(name)
        value = self.data.get(name)
        if value is None and required:
            self.fail(name, "required field is missing or null")
        return value

    def text(self, name: str, required: bool = False, choices: tuple = ()) -> str | None:
        """A string field, optionally restricted to choices."""
        value = self.get(name, required)
        if value is not None and not (isinstance(value, str) and (value or not required)):
            self.fail(name, f"expected a non-empty string, got {value!r}")
        if value is not None and choices and value not in choices:
            self.fail(name, f"expected one of {', '.join(choices)}; got {value!r}")
        return value

    def integer(self, name: str, required: bool = False, minimum: int = 1) -> int | None:
        """An integer field with a lower bound."""
        value = self.get(name, required)
        if value is not None and (type(value) is not int or value < minimum):
            self.fail(name, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, name: str, required: bool = False, allow_inf: bool = False) -> float | None:
        """A non-negative number field (NaN never, infinity only if allowed)."""
        value = self.get(name, required)
        if value is None:
            return None
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not value >= 0 or (math.isinf(value) and not allow_inf):
            self.fail(name, f"expected a non-negative number, got {value!r}")
        return float(value)

    def flag(self, name: str) -> bool:
        """A required boolean field."""
        value = self.get(name, required=True)
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {value!r}")
        return value

    def child(self, name: str, required: bool = False) -> Fields | None:
        """A nested object field."""
        value = self.get(name, required)
        return None if value is None else Fields(value, self.at(name))

    def items(self, name: str) -> list[tuple[str, Any]]:
        """A required list field as (path, value) pairs."""
        value = self.get(name, required=True)
        if not isinstance(value, list):
            self.fail(name, f"expected a list, got {_kind(value)}")
        return [(f"{self.at(name)}[{i}]", item) for i, item in enumerate(value)]

    def done(self) -> None:
        """Reject fields the schema does not define."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(unknown[0], "unknown field")


def number_fields(cls, data: Any, path: str, required: bool, allow_inf: tuple = ()):
    """Build a dataclass whose fields are all numbers."""
    f = Fields(data, path)
    values = {x.name: f.number(x.name, required, x.name in allow_inf) for x in fields(cls)}
    f.done()
    return cls(**values)
