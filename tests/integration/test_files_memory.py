"""A 1 GiB file through a real prefork worker in constant memory (child RSS measured with psutil)."""

from __future__ import annotations

import threading

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GIB = 1 << 30
MAX_GROWTH = 64 << 20


class _PeakRss(threading.Thread):
    """Samples the RSS of one process until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)


def test_one_gib_file_keeps_worker_memory_flat(start_worker, files_root):
    from tasks.files import compress, inspect_file, process_upload

    worker = start_worker("files", pool="prefork", concurrency=1)
    (files_root / "warm.txt").write_text("warm up: imports and first allocations happen here\n")
    inspect_file.delay("warm.txt").get(timeout=30)
    compress.delay("warm.txt", format="zstd").get(timeout=30)
    with (files_root / "big.bin").open("wb") as handle:
        handle.truncate(GIB)  # sparse: quick to make; the worker still reads and hashes every byte
    [child] = psutil.Process(worker.proc.pid).children()
    baseline = child.memory_info().rss
    sampler = _PeakRss(child.pid)
    sampler.start()
    try:
        summary = process_upload.delay("big.bin").get(timeout=240)
        packed = compress.delay("big.bin", format="zstd").get(timeout=240)
    finally:
        sampler.done.set()
        sampler.join()
    assert summary["size"] == GIB and packed["size"] == GIB
    assert psutil.Process(worker.proc.pid).children()[0].pid == child.pid  # same child did the work
    growth = sampler.peak - baseline
    print(f"worker child RSS: baseline {baseline >> 20} MiB, peak {sampler.peak >> 20} MiB")
    assert growth < MAX_GROWTH, f"grew by {growth >> 20} MiB"
