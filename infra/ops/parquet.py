"""`mlapi predictions --format parquet`: the exported JSON lines as one Parquet file, in bounded memory.

The replica streams JSON lines (it has no Arrow); they are spooled to a file here, then read twice in batches: once to
agree on one schema for every batch (a column that is null in the first rows and a number later, an int column that
holds a float later), once to write. Each row's ``features`` object becomes columns ``features.<name>``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BATCH_ROWS = 10_000


def batches(source: Path, rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The JSON lines of ``source`` as tables of at most ``rows`` rows, nested objects flattened."""
    batch: list[dict] = []
    with source.open("rb") as lines:
        for line in lines:
            if line.strip():
                batch.append(json.loads(line))
            if len(batch) == rows:
                yield pa.Table.from_pylist(batch).flatten()
                batch = []
    if batch:
        yield pa.Table.from_pylist(batch).flatten()


def jsonl_to_parquet(source: Path, target: Path, rows: int = BATCH_ROWS) -> int:
    """Write ``source``'s JSON lines to ``target`` as Parquet (one row group per batch); the number of rows."""
    schemas = [table.schema for table in batches(source, rows)]
    if not schemas:
        pq.write_table(pa.table({}), target)
        return 0
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    written = 0
    with pq.ParquetWriter(target, schema) as writer:
        for table in batches(source, rows):
            missing = [name for name in schema.names if name not in table.column_names]
            for name in missing:  # a column every row of this batch left out
                table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
            writer.write_table(table.select(schema.names).cast(schema))
            written += len(table)
    return written
