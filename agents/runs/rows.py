"""Model instances from rows of plain SQL, converted as the ORM converts them.

The hot paths (a worker's claim, reading one run for the API) send statements written once per
process; building and compiling the equivalent queryset on every call cost more than running it.
"""

import functools
from collections.abc import Sequence
from typing import Any

from django.db import connection, models


class RowReader:
    """Reads instances of `model` from `fields` of a row (in that order), starting at a column offset."""

    def __init__(self, model: type[models.Model], fields: Sequence[models.Field]) -> None:
        self.model = model
        self.fields = list(fields)

    @functools.cached_property
    def _names_and_converters(self) -> tuple[list[str], list]:
        converters = []
        for field in self.fields:
            column = field.get_col(self.model._meta.db_table)
            found = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
            converters.append(functools.partial(_converted, found, column) if found else None)
        return [field.attname for field in self.fields], converters

    def columns(self, alias: str) -> str:
        """The fields' columns for a SELECT or RETURNING list, qualified by `alias`."""
        quote = connection.ops.quote_name
        return ", ".join(f"{alias}.{quote(field.column)}" for field in self.fields)

    def read(self, row: Sequence[Any], start: int = 0) -> models.Model:
        names, converters = self._names_and_converters
        values = row[start : start + len(names)]
        converted = [convert(value) if convert else value for convert, value in zip(converters, values, strict=True)]
        return self.model.from_db(connection.alias, names, converted)

    def __len__(self) -> int:
        return len(self.fields)


def _converted(converters: list, column, value):
    for convert in converters:
        value = convert(value, column, connection)
    return value
