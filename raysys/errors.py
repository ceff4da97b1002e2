"""User-facing errors: one line that names the file, the row and the field, and what to do."""

from __future__ import annotations


def locate(message: str, *, file: str | None = None, row: int | str | None = None,
           field: str | None = None, hint: str | None = None, row_label: str = "row") -> str:
    """'file, row 3, field 'x': message (hint)' on one line (any newline in the parts is folded)."""
    where = []
    if file is not None:
        where.append(str(file))
    if row is not None:
        where.append(f"{row_label} {row}")
    if field is not None:
        where.append(f"field '{field}'")
    text = ": ".join([", ".join(where), message]) if where else message
    if hint:
        text += f" ({hint})"
    return " ".join(text.split("\n")).replace("\r", " ")


class RaysysError(Exception):
    """An error caused by user input or configuration (the CLI prints it without a traceback)."""


class DataError(RaysysError, ValueError):
    """Bad input data, located precisely."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None, hint: str | None = None):
        super().__init__(locate(message, file=file, row=row, field=field, hint=hint))
        self.file, self.row, self.field = file, row, field


class ConfigError(RaysysError, ValueError):
    """A configuration value out of range or inconsistent with the data.

    `ConfigError("text")` works as before; with keywords it is located like a DataError, with
    the config file's `line` (or the command-line override as `file`) and the dotted key as field.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, hint: str | None = None):
        super().__init__(locate(message, file=file, row=line, field=field, hint=hint, row_label="line"))
        self.file, self.row, self.field = file, line, field
