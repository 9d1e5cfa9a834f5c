"""Which column (or JSON key) holds which of our fields: ``--text-field NAME`` and ``--field-map prompt=question,...``.

Datasets people already keep name their columns their own way (``question``/``answer``, ``instruction``/``output``,
``conversation``). Rather than asking them to rewrite the data, a run names the columns; everything else reads the
canonical names below.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import PacaConfigError

#: Our field names: ``text``; ``prompt`` with ``response`` (or TRL's ``completion``); ``messages`` (OpenAI/TRL chat).
FIELDS = ("text", "prompt", "response", "completion", "messages")


@dataclass(frozen=True)
class FieldMap:
    """Column names for our fields; a field not named here is read under its own name."""

    columns: tuple[tuple[str, str], ...] = ()
    #: Fields the user named: detection then looks only at those forms (``--text-field body`` reads ``body`` as text,
    #: even in a dataset that also has a ``messages`` column).
    explicit: frozenset[str] = field(default_factory=frozenset)

    def column(self, name: str) -> str:
        return dict(self.columns).get(name, name)

    def flag_for(self, name: str) -> str:
        """``name``'s column as messages quote it: ``'body'``, or ``'body' (the text field named by the flags)``."""
        column = self.column(name)
        return f"{column!r} (the {name} field named by --text-field/--field-map)" if name in self.explicit else repr(column)

    def describe(self) -> dict[str, str]:
        return dict(self.columns)


def parse_field_map(field_map: str | None, text_field: str | None = None) -> FieldMap:
    """``--field-map prompt=question,response=answer`` and ``--text-field body`` as one :class:`FieldMap`."""
    columns: dict[str, str] = {}
    if field_map:
        for part in field_map.split(","):
            if not part.strip():
                continue
            name, sep, column = (s.strip() for s in part.partition("="))
            if not sep or not name or not column:
                raise PacaConfigError(f"--field-map {field_map!r}: expected FIELD=COLUMN pairs separated by commas "
                                      "(e.g. prompt=question,response=answer).")
            if name not in FIELDS:
                hint = f" (write FIELD=COLUMN: {column}={name})" if column in FIELDS else ""
                raise PacaConfigError(f"--field-map: unknown field {name!r}{hint}; the fields are {', '.join(FIELDS)}.")
            if name in columns and columns[name] != column:
                raise PacaConfigError(f"--field-map names two columns for {name!r} ({columns[name]!r} and {column!r}); keep one.")
            columns[name] = column
    if text_field is not None:
        if not text_field.strip():
            raise PacaConfigError("--text-field needs a column name.")
        if columns.get("text", text_field) != text_field:
            raise PacaConfigError(f"--text-field {text_field!r} and --field-map text={columns['text']} disagree; keep one.")
        columns["text"] = text_field
    if "response" in columns and "completion" in columns:
        raise PacaConfigError("--field-map: map either 'response' or 'completion' (the same field under TRL's name), not both.")
    return FieldMap(tuple(sorted(columns.items())), frozenset(columns))
