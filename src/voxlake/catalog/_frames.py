"""DuckDB results as pandas, with exact integers and the SQL type of every column.

DuckDB's ``.df()`` turns ``HUGEINT`` columns into float64 (``sum()`` of an integer column
is a ``HUGEINT``, so ``sum(n_slices)`` read ``66.0``, and integers past 2**53 lost their
last digits) and refuses ``UHUGEINT``; those columns are read through Arrow instead and
come back as integers. The SQL types are recorded in ``frame.attrs["sql_types"]``
(column name -> DuckDB type) for writers that need what pandas cannot tell apart, such
as a ``DATE`` from a ``TIMESTAMP`` at midnight.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["result_frame"]

#: 128-bit integer types: float64 in ``.df()`` (HUGEINT) or not converted at all.
_WIDE_INTEGERS = frozenset({"HUGEINT", "UHUGEINT"})
_INT64 = (-(2**63), 2**63 - 1)


def result_frame(cursor: Any) -> pd.DataFrame:
    """The result of the statement ``cursor`` (a DuckDB connection) just executed."""
    description = list(cursor.description or [])
    kinds = [str(column[1]) for column in description]
    wide = [i for i, kind in enumerate(kinds) if kind in _WIDE_INTEGERS]
    frame: pd.DataFrame = _exact_frame(cursor, wide, kinds) if wide else cursor.df()
    names = [str(column[0]) for column in description]
    frame.attrs["sql_types"] = dict(zip(names, kinds, strict=True))
    return frame


def _exact_frame(cursor: Any, wide: list[int], kinds: list[str]) -> pd.DataFrame:
    """Read the result through Arrow, where 128-bit integers keep every digit."""
    import pandas as pd

    with warnings.catch_warnings():
        # "Arrow output on a DB-API result makes an extra copy": the statement has
        # already run, so a copy is what there is.
        warnings.simplefilter("ignore", UserWarning)
        table = cursor.to_arrow_table()
    keep = [i for i in range(table.num_columns) if i not in wide]
    rest = table.select(keep)
    frame: pd.DataFrame = (
        cursor.from_arrow(rest).df()
        if rest.num_columns
        else pd.DataFrame(index=pd.RangeIndex(table.num_rows))
    )
    for i in wide:
        values = [None if v is None else int(v) for v in table.column(i).to_pylist()]
        if kinds[i] == "UHUGEINT":
            # Arrow has no unsigned 128-bit type: DuckDB hands over the bits as a signed
            # decimal, so values from 2**127 up arrive negative.
            values = [v + 2**128 if v is not None and v < 0 else v for v in values]
        frame.insert(i, table.column_names[i], _integer_column(values), allow_duplicates=True)
    return frame


def _integer_column(values: list[int | None]) -> Any:
    """int64 where every value fits (Int64 with nulls, as ``.df()`` gives BIGINT), else
    Python ints."""
    import numpy as np
    import pandas as pd

    present = [v for v in values if v is not None]
    if all(_INT64[0] <= v <= _INT64[1] for v in present):
        if len(present) == len(values):
            return np.asarray(values, dtype=np.int64)
        return pd.array(values, dtype="Int64")
    return pd.Series(values, dtype=object).to_numpy()
