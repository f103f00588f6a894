#!/usr/bin/env python3
"""Reads a tenant's month of the chatvault archive with a standard reader, given the month's data key.

This is what a data team does with DuckDB or pyarrow (see docs/ARCHITECTURE.md, "Reading the archive with
standard tools"), and what the standard-reader tests run. It prints one JSON object per row, sorted by
event_id, with the columns the tests compare.

    read_archive.py --reader duckdb --root ARCHIVE_DIR --tenant acme --month 2026-11 --key-base64 KEY

Exit status 2 when the reader cannot open the files (for example with a wrong key).
"""

import argparse
import base64
import glob
import json
import os
import sys

COLUMNS = ["event_id", "conversation_id", "kind", "text", "sender_id", "thread_id", "message_id",
           "kafka_partition", "kafka_offset"]


def files_of(root, tenant, month):
    pattern = os.path.join(root, "events", f"tenant={tenant}", f"date={month}-*", "*.parquet")
    return pattern, sorted(glob.glob(pattern))


def rows_from_duckdb(pattern, key_b64):
    import duckdb

    # PRAGMA statements cannot take prepared parameters; the key is checked to be plain base64 first.
    base64.b64decode(key_b64, validate=True)
    con = duckdb.connect()
    con.execute(f"PRAGMA add_parquet_key('chatvault_month', '{key_b64}')")
    query = f"""
        SELECT {", ".join(COLUMNS)}, epoch_us(occurred_at) AS occurred_at_micros, tenant, date
        FROM read_parquet(?, encryption_config = {{footer_key: 'chatvault_month'}}, hive_partitioning = true)
        ORDER BY event_id
    """
    cursor = con.execute(query, [pattern])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def rows_from_pyarrow(files, key_b64):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyarrow.parquet.encryption as pe

    key = base64.b64decode(key_b64)
    properties = pe.create_decryption_properties(footer_key=key)
    tables = []
    for path in files:
        table = pq.read_table(path, decryption_properties=properties)
        date = os.path.basename(os.path.dirname(path)).split("=", 1)[1]
        tenant = os.path.basename(os.path.dirname(os.path.dirname(path))).split("=", 1)[1]
        occurred = table.column("occurred_at").cast(pa.int64())
        table = table.select(COLUMNS).append_column("occurred_at_micros", occurred)
        table = table.append_column("tenant", pa.array([tenant] * table.num_rows))
        table = table.append_column("date", pa.array([date] * table.num_rows))
        tables.append(table)
    if not tables:
        return []
    rows = pa.concat_tables(tables).to_pylist()
    return sorted(rows, key=lambda row: row["event_id"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", choices=["duckdb", "pyarrow"], required=True)
    parser.add_argument("--root", required=True, help="archive root directory (holds events/)")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--month", required=True, help="yyyy-mm")
    parser.add_argument("--key-base64", required=True, help="the month's data key (chatvault keys export)")
    args = parser.parse_args()

    pattern, files = files_of(args.root, args.tenant, args.month)
    if not files:
        print(f"no files match {pattern}", file=sys.stderr)
        return 1
    try:
        if args.reader == "duckdb":
            rows = rows_from_duckdb(pattern, args.key_base64)
        else:
            rows = rows_from_pyarrow(files, args.key_base64)
    except Exception as error:  # the reader's own error is the message
        print(f"{args.reader} could not read the archive: {error}", file=sys.stderr)
        return 2
    for row in rows:
        row["date"] = str(row["date"])
        print(json.dumps(row, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
