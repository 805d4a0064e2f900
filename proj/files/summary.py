"""The summary of a processed upload, and the notification email that reports it."""

from __future__ import annotations

from typing import Any

MAX_LISTED = 20


def summarize(info: dict[str, Any], outputs: dict[str, Any], notify: str | None = None) -> dict[str, Any]:
    """One JSON-able summary: what the file is, and what the pipeline made of it."""
    return {**info, "outputs": outputs, "notified": notify}


def notification(summary: dict[str, Any]) -> dict[str, str]:
    """Subject, text body and idempotency key of the email announcing `summary`."""
    lines = [
        f"File:    {summary['key']}",
        f"Type:    {summary['kind']} ({summary['mime']})",
        f"Size:    {summary['size']} bytes",
        f"SHA-256: {summary['sha256']}",
        "",
        *_output_lines(summary["outputs"]),
    ]
    return {
        "subject": f"Processed {summary['key']} ({summary['kind']})",
        "text": "\n".join(lines) + "\n",
        # Same file content, same recipient: a re-run or a redelivery does not mail twice.
        "idempotency_key": f"files.process_upload:{summary['key']}:{summary['sha256']}:{summary['notified']}",
    }


def _output_lines(outputs: dict[str, Any]) -> list[str]:
    """Human-readable lines for each kind of output."""
    if "thumbnails" in outputs:
        return _listing("Thumbnails", outputs["thumbnails"])
    if "members" in outputs:
        members = [f"{m['key']} ({m['kind']}, {m['size']} bytes)" for m in outputs["members"]]
        return _listing("Extracted", members)
    if "import" in outputs:
        stats = outputs["import"]
        return [
            f"CSV: {stats['rows']} rows, {len(stats['columns'])} columns, "
            f"{stats['failed_rows']} failed rows (report: {stats['report_key']})"
        ]
    return ["No further processing for this kind of file."]


def _listing(title: str, items: list[str]) -> list[str]:
    """A titled list, cut after MAX_LISTED items."""
    lines = [f"{title} ({len(items)}):", *[f"  {item}" for item in items[:MAX_LISTED]]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more")
    return lines
