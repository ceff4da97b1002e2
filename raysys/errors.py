"""User-facing errors: one line that names the file, the row and the field, and what to do."""

from __future__ import annotations


class RaysysError(Exception):
    """An error caused by user input or configuration (the CLI prints it without a traceback)."""


class DataError(RaysysError, ValueError):
    """Bad input data, located precisely."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None, hint: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (": ".join([", ".join(where), message]) if where else message)
        if hint:
            text += f" ({hint})"
        super().__init__(text)
        self.file, self.row, self.field = file, row, field


class ConfigError(RaysysError, ValueError):
    """A configuration value out of range or inconsistent with the data."""
