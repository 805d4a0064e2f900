"""Streaming CSV import: per-column statistics and a report of the rows that failed to parse."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from proj.errors import InvalidFileError
from proj.files.sniff import csv_delimiter, read_csv_sample, sample_is_whole
from proj.files.storage import ProgressCallback, Storage, derived_key, io_errors, no_progress

REPORT_HEADER = ("line", "error", "fields")
# Progress every this many rows: tell() is a syscall, rows are cheap.
_PROGRESS_ROWS = 4096


@dataclass
class ColumnStats:
    """Counts for one column: filled cells, empty cells, numeric cells and their range."""

    name: str
    count: int = 0
    empty: int = 0
    numeric: int = 0
    min: float | None = None
    max: float | None = None

    def add(self, value: str) -> None:
        """Account for one cell."""
        value = value.strip()
        if not value:
            self.empty += 1
            return
        self.count += 1
        try:
            number = float(value)
        except ValueError:
            return
        if math.isfinite(number):
            self.numeric += 1
            self.min = number if self.min is None else min(self.min, number)
            self.max = number if self.max is None else max(self.max, number)


def import_csv(
    storage: Storage, key: str, *, max_field: int, on_progress: ProgressCallback = no_progress
) -> dict[str, Any]:
    """Read the CSV at `key` in one streaming pass; failed rows go to derived/<key>/import-errors.csv."""
    report_key = derived_key(key, "import-errors.csv")
    with io_errors(key):
        path = storage.file(key)
        total = path.stat().st_size
        with path.open("rb") as raw, storage.writer(report_key) as report_raw:
            delimiter = _dialect(read_csv_sample(raw))
            raw.seek(0)
            report_text = io.TextIOWrapper(report_raw, encoding="utf-8", newline="")
            stats = _scan(raw, total, delimiter, max_field, csv.writer(report_text), on_progress)
            report_text.flush()
            report_text.detach()  # the atomic writer owns the file: it fsyncs and renames it
    on_progress(total, total)
    return {"key": key, **stats, "report_key": report_key}


def _dialect(sample: bytes) -> str:
    """Guess the delimiter from the first bytes; a comma if nothing fits better."""
    text = sample.decode("utf-8", errors="ignore")
    return csv_delimiter(text, whole=sample_is_whole(sample)) or ","


@dataclass
class _Table:
    """The statistics so far; rows of the wrong width go to the report instead."""

    report: Any
    columns: list[ColumnStats]
    rows: int = 0
    failed: int = 0

    def add(self, row: list[str], line: int) -> None:
        """Take the first row as the header, then count each row or report it."""
        if not self.columns:
            self.columns = [ColumnStats(name) for name in row]
        elif len(row) != len(self.columns):
            self.failed += 1
            error = f"expected {len(self.columns)} fields, got {len(row)}"
            self.report.writerow((line, error, json.dumps(row)))
        else:
            self.rows += 1
            for column, value in zip(self.columns, row, strict=True):
                column.add(value)


def _scan(
    raw: IO[bytes], total: int, delimiter: str, max_field: int, report: Any, on_progress: ProgressCallback
) -> dict[str, Any]:
    """Walk the rows once, building column statistics and writing bad rows to `report`."""
    csv.field_size_limit(max_field)
    reader = csv.reader(_decoded_lines(raw, max_field), delimiter=delimiter)
    report.writerow(REPORT_HEADER)
    table = _Table(report, [])
    try:
        for row in reader:
            if row:
                table.add(row, reader.line_num)
            if reader.line_num % _PROGRESS_ROWS == 0:
                on_progress(min(raw.tell(), total), total)
    except csv.Error as exc:
        raise InvalidFileError(f"CSV cannot be parsed at line {reader.line_num}: {exc}") from exc
    if not table.columns:
        raise InvalidFileError("CSV has no header row")
    return {"rows": table.rows, "failed_rows": table.failed, "columns": [vars(c) for c in table.columns]}


def _decoded_lines(raw: IO[bytes], limit: int) -> Iterator[str]:
    """Yield physical lines as text, refusing invalid UTF-8 and lines too long to hold in memory."""
    number = offset = 0
    while line := raw.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            raise InvalidFileError(f"CSV line {number} is longer than {limit} bytes (huge field)")
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]  # spreadsheets write one; it is not part of the header
            offset += len(codecs.BOM_UTF8)
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"line {number}, byte {offset + exc.start}"
            raise InvalidFileError(f"CSV is not valid UTF-8 at {where}: {exc.reason}") from exc
        offset += len(line)
