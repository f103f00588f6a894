#!/usr/bin/env python3
"""Reads a tenant's months of the chatvault archive with a standard reader, given each month's data key.

These are the reading recipes of the README ("Reading the archive with standard tools"), and what the
standard-reader tests run, so they are known to work:

- DuckDB: `duckdb_events_view` defines a view `events` over a tenant's months (one `read_parquet` per month,
  since DuckDB takes one footer key per call), with the setting that filtered queries need on encrypted files.
- pyarrow: `pyarrow_events_dataset` is a `pyarrow.dataset` over the Hive partitions of those months.

    read_archive.py --reader duckdb --root ARCHIVE_DIR --tenant acme --key 2026-10=KEY --key 2026-11=KEY
    read_archive.py --reader duckdb ... --conversation C1 --from-micros 1764000000000000 --to-micros ...
    read_archive.py --reader duckdb ... --sql "SELECT conversation_id, count(*) FROM events GROUP BY ALL"

Rows are printed as JSON objects, one per line, sorted by (conversation_id, event_id, kafka_offset), with
every column; `occurred_at` and `received_at` as microseconds since the epoch and `raw_payload` as hex.
`--sql` prints whatever the query returns, one JSON object per row. `--month M --key-base64 K` is the
one-month form of `--key M=K`.

Exit status 2 when the reader cannot open the files (for example with a wrong key).
"""

import argparse
import base64
import glob
import json
import os
import re
import sys

TIMESTAMP_COLUMNS = ("occurred_at", "received_at")


def month_glob(root, tenant, month):
    """The files of a tenant's month under its default data key. Files of a key scope (`keys.scopes`) are named
    `s-<scope>-...` and need that scope's key; default ones start with `p`."""
    return os.path.join(root, "events", f"tenant={tenant}", f"date={month}-*", "p*.parquet")


def duckdb_events_view(con, root, tenant, month_keys):
    """Defines the view `events` over `month_keys` ({"yyyy-mm": base64 key}) of `tenant` on connection `con`.

    Every month is one `read_parquet` with its own key; the view is their `UNION ALL BY NAME` and carries the
    Hive columns `tenant` and `date`. Filter pushdown is switched off: DuckDB 2.0.1 fails any `WHERE` that it
    pushes into an encrypted `read_parquet` ("Computed AES tag differs from read AES tag"), and evaluates the
    same filters correctly after the scan.
    """
    con.execute("SET disabled_optimizers = 'filter_pushdown'")
    selects = []
    for month, key_b64 in sorted(month_keys.items()):
        if not re.fullmatch(r"\d{4}-\d{2}", month):
            raise ValueError(f"month {month!r} is not yyyy-mm")
        # PRAGMA statements take no prepared parameters: the key must be plain base64.
        base64.b64decode(key_b64, validate=True)
        name = f"chatvault_{tenant}_{month.replace('-', '_')}"
        con.execute(f"PRAGMA add_parquet_key('{name}', '{key_b64}')")
        pattern = month_glob(root, tenant, month).replace("'", "''")
        selects.append(
            f"SELECT * FROM read_parquet('{pattern}', encryption_config = {{footer_key: '{name}'}}, "
            f"hive_partitioning = true)"
        )
    con.execute("CREATE OR REPLACE VIEW events AS " + " UNION ALL BY NAME ".join(selects))


def pyarrow_events_dataset(root, tenant, month_keys):
    """A `pyarrow.dataset.Dataset` over `month_keys` ({"yyyy-mm": base64 key}) of `tenant`, with the Hive
    columns `tenant` and `date`: one dataset per month (each with its key), united."""
    import pyarrow.dataset as ds
    import pyarrow.parquet.encryption as pe

    months = []
    for month, key_b64 in sorted(month_keys.items()):
        properties = pe.create_decryption_properties(footer_key=base64.b64decode(key_b64, validate=True))
        parquet = ds.ParquetFileFormat(
            default_fragment_scan_options=ds.ParquetFragmentScanOptions(decryption_properties=properties))
        files = sorted(glob.glob(month_glob(root, tenant, month)))
        if files:
            months.append(ds.dataset(files, format=parquet, partitioning="hive",
                                     partition_base_dir=os.path.join(root, "events")))
    if not months:
        raise FileNotFoundError(f"no files for tenant {tenant} in {sorted(month_keys)}")
    return months[0] if len(months) == 1 else ds.dataset(months)


def rows_from_duckdb(args, month_keys):
    import duckdb

    con = duckdb.connect()
    duckdb_events_view(con, args.root, args.tenant, month_keys)
    if args.sql:
        cursor = con.execute(args.sql)
    else:
        where, params = [], []
        if args.conversation:
            where.append("conversation_id = ?")
            params.append(args.conversation)
        if args.from_micros is not None:
            where.append("occurred_at >= make_timestamp(?)")
            params.append(args.from_micros)
        if args.to_micros is not None:
            where.append("occurred_at < make_timestamp(?)")
            params.append(args.to_micros)
        query = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        cursor = con.execute(query, params)
    names = [d[0] for d in cursor.description]
    rows = []
    while True:
        chunk = cursor.fetchmany(10_000)
        if not chunk:
            break
        rows.extend(dict(zip(names, row)) for row in chunk)
    return rows


def rows_from_pyarrow(args, month_keys):
    import datetime
    import pyarrow.dataset as ds

    if args.sql:
        raise ValueError("--sql needs --reader duckdb")
    dataset = pyarrow_events_dataset(args.root, args.tenant, month_keys)
    condition = None

    def both(a, b):
        return b if a is None else a & b

    utc = datetime.timezone.utc
    if args.conversation:
        condition = both(condition, ds.field("conversation_id") == args.conversation)
    if args.from_micros is not None:
        since = datetime.datetime.fromtimestamp(args.from_micros / 1e6, tz=utc)
        condition = both(condition, ds.field("occurred_at") >= since)
    if args.to_micros is not None:
        until = datetime.datetime.fromtimestamp(args.to_micros / 1e6, tz=utc)
        condition = both(condition, ds.field("occurred_at") < until)
    return dataset.to_table(filter=condition).to_pylist()


def normalized(row):
    """JSON-ready: timestamps as epoch microseconds, bytes as hex, dates as ISO text."""
    import datetime

    out = {}
    for name, value in row.items():
        if isinstance(value, datetime.datetime):
            epoch = datetime.datetime(1970, 1, 1, tzinfo=value.tzinfo)
            delta = value - epoch
            value = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).hex()
        elif isinstance(value, datetime.date):
            value = value.isoformat()
        out[name] = value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", choices=["duckdb", "pyarrow"], required=True)
    parser.add_argument("--root", required=True, help="archive root directory (holds events/)")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--key", action="append", default=[], metavar="YYYY-MM=KEY",
                        help="a month and its base64 data key (chatvault keys export); repeat for a range")
    parser.add_argument("--month", help="yyyy-mm (with --key-base64)")
    parser.add_argument("--key-base64", help="the month's data key (with --month)")
    parser.add_argument("--conversation", help="only this conversation")
    parser.add_argument("--from-micros", type=int, help="only events at or after (epoch microseconds)")
    parser.add_argument("--to-micros", type=int, help="only events before (epoch microseconds)")
    parser.add_argument("--sql", help="run this query against the view `events` (DuckDB)")
    args = parser.parse_args()

    month_keys = dict(item.split("=", 1) for item in args.key)
    if args.month or args.key_base64:
        if not (args.month and args.key_base64):
            parser.error("--month and --key-base64 go together")
        month_keys[args.month] = args.key_base64
    if not month_keys:
        parser.error("give at least one --key YYYY-MM=KEY")
    if not any(glob.glob(month_glob(args.root, args.tenant, month)) for month in month_keys):
        print(f"no files of tenant {args.tenant} for {sorted(month_keys)} under {args.root}", file=sys.stderr)
        return 1
    try:
        if args.reader == "duckdb":
            rows = rows_from_duckdb(args, month_keys)
        else:
            rows = rows_from_pyarrow(args, month_keys)
    except Exception as error:  # the reader's own error is the message
        print(f"{args.reader} could not read the archive: {error}", file=sys.stderr)
        return 2
    rows = [normalized(row) for row in rows]
    if not args.sql:
        rows.sort(key=lambda r: (r.get("conversation_id") or "", r.get("event_id") or "", r.get("kafka_offset") or 0))
    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row, sort_keys=True, ensure_ascii=False))
        out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
