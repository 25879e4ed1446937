"""Prediction rows as Parquet: the columns of ``au-detect predict``'s CSV with their types.

A run writes its rows to ``<out>.partial`` as CSV as they arrive (the journal a killed run
resumes from, see :mod:`experiments.predict`); with ``--out rows.parquet`` the finished journal is
streamed into Parquet, a row group per ``row_group_rows`` rows, so memory holds one row group
whatever the run's size, and the file appears whole or not at all. The journal is what makes a
run resumable: a Parquet file cannot be appended to once its footer is written, and one without
a footer cannot be read at all.

Types: ``source``, ``status``, ``message`` strings; ``frame``, ``face``, ``person`` int64 (null
for photos and rows without a face); box, landmarks, ``confidence``, ``time_s``, probabilities and
intensities float64; decisions (``AU12``, ``AU12_smooth``) int8. An empty CSV cell is null,
except in the string columns, where it stays an empty string (as the CSV has it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

STRINGS = ("source", "status", "message")
INTEGERS = ("frame", "face", "person")
ROW_GROUP_ROWS = 65_536


def column_type(name: str):
    """The Arrow type of one column of the rows, by its name (see the module's docstring)."""
    import pyarrow as pa

    if name in STRINGS:
        return pa.string()
    if name in INTEGERS:
        return pa.int64()
    if name.startswith("AU") and not name.endswith(("_prob", "_intensity")):
        return pa.int8()  # a decision: AU12, AU12_smooth
    return pa.float64()


def row_schema(header: Sequence[str]):
    """The Arrow schema of rows with these columns."""
    import pyarrow as pa

    return pa.schema([pa.field(name, column_type(name)) for name in header])


def csv_to_parquet(csv_path: str | Path, parquet_path: str | Path, header: Sequence[str],
                   row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Stream the rows of ``csv_path`` (written with ``header``, cells unescaped) into
    ``parquet_path``, written whole (a temporary file renamed onto it); returns the rows written.
    A cell that does not parse as its column's type raises ``ValueError`` naming the file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    csv_path, parquet_path = Path(csv_path), Path(parquet_path)
    schema = row_schema(header)
    tmp = parquet_path.with_name(f".{parquet_path.name}.tmp")
    rows = 0
    try:
        reader = pacsv.open_csv(
            csv_path, read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=schema, strings_can_be_null=False,
                                                 include_columns=list(header), quoted_strings_can_be_null=False))
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            pending: list = []
            held = 0
            for batch in reader:
                pending.append(batch)
                held += batch.num_rows
                while held >= row_group_rows:
                    table = pa.Table.from_batches(pending, schema)
                    writer.write_table(table.slice(0, row_group_rows), row_group_size=row_group_rows)
                    rest = table.slice(row_group_rows)
                    pending, held = rest.to_batches(), rest.num_rows
                    rows += row_group_rows
            if held:
                writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=row_group_rows)
                rows += held
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, parquet_path)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{csv_path}: the rows do not convert to Parquet: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return rows
