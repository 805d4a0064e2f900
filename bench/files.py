"""File processing: inspect_file against sha256sum, thumbnails per second, worker memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench import common

NOTES = """\
- `inspect_file` streams the file in 1 MiB chunks through hashlib's SHA-256 (OpenSSL) and sniffs
  its type; the time is from enqueue to result, through Redis and a prefork worker. `sha256sum`
  (coreutils) hashes the same file in the same run; both read it from the page cache.
  `speed vs sha256sum` is sha256sum's time divided by the task's (goal: at least 0.9).
- Thumbnails: 12 MP JPEGs (4000x3000), two boxes each (320 and 1024). JPEG draft mode decodes at
  1/2 scale since the largest box needs no more. `worker` is `-P prefork -c <cores>` as in the
  Procfile; `single process` calls the same service function in a loop in one process.
- Peak RSS is sampled every 20 ms with psutil: the prefork children together, and the largest one.
"""

FILES_QUEUE = "files"
BIG_FILE = 1 << 30
PHOTO_SIZE = (4000, 3000)
PHOTOS = 200
_SCRATCH = Path(tempfile.gettempdir()) / "proj-bench-files"


class PeakRss(threading.Thread):
    """Samples the RSS of a worker's pool children until stopped; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.parent = psutil.Process(pid)
        self.total = self.largest = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            sizes = []
            for child in self.parent.children():
                try:
                    sizes.append(child.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    continue
            self.total = max(self.total, sum(sizes))
            self.largest = max(self.largest, max(sizes, default=0.0))

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """One run of every files scenario against the Redis at `redis_url`."""
    common.point_env_at(redis_url)
    root = _SCRATCH / "files"
    shutil.rmtree(_SCRATCH, ignore_errors=True)
    root.mkdir(parents=True)
    cores = os.cpu_count() or 1
    worker = _start_worker(redis_url, root, cores)
    try:
        rows = _inspect_rows(root, worker, (128 << 20) if quick else BIG_FILE)
        rows += _thumbnail_rows(root, worker, 20 if quick else PHOTOS, cores)
    finally:
        common.stop([worker])
        shutil.rmtree(_SCRATCH, ignore_errors=True)
    return rows


def _start_worker(redis_url: str, root: Path, cores: int) -> subprocess.Popen[bytes]:
    """The files worker as the Procfile starts it."""
    from proj.celery import app

    name = f"bench-files-{common.free_port()}"
    cmd = common.celery_worker(
        "proj",
        "-Q",
        FILES_QUEUE,
        "-P",
        "prefork",
        "-c",
        str(cores),
        "-n",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "WARNING",
    )
    proc = common.spawn(cmd, common.child_env(redis_url, FILES_ROOT=str(root)), _SCRATCH / "worker.log")
    common.ping_until_ready(app, [f"{name}@{os.uname().nodename}"])
    return proc


def _send(name: str, *args: Any) -> Any:
    from proj.celery import app

    return app.send_task(f"tasks.files.{name}", args=list(args))


def _inspect_rows(root: Path, worker: subprocess.Popen[bytes], size: int) -> list[common.Row]:
    """inspect_file through the worker against sha256sum on the same file, best of two each."""
    path = _write_big_file(root / "big.bin", size)
    label = f"inspect_file {size >> 20} MiB"
    _sha256sum(path)  # warm the page cache for both
    task_times, tool_times = [], []
    with PeakRss(worker.pid) as rss:
        for _ in range(2):
            started = time.perf_counter()
            _send("inspect_file", "big.bin").get(timeout=600)
            task_times.append(time.perf_counter() - started)
            tool_times.append(_sha256sum(path))
    task, tool = min(task_times), min(tool_times)
    return [
        common.row(label, "inspect_file throughput", size / 2**20 / task, "MiB/s"),
        common.row(label, "sha256sum throughput", size / 2**20 / tool, "MiB/s"),
        common.ratio(label, "speed vs sha256sum", tool, task),
        common.row(label, "peak RSS of the largest worker child", rss.largest, "MiB"),
    ]


def _write_big_file(path: Path, size: int) -> Path:
    """Real (not sparse) bytes: one random 4 MiB block written over and over."""
    block = os.urandom(4 << 20)
    with path.open("wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
    return path


def _sha256sum(path: Path) -> float:
    """Seconds `sha256sum` takes on `path`."""
    started = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _thumbnail_rows(root: Path, worker: subprocess.Popen[bytes], count: int, cores: int) -> list[common.Row]:
    """Thumbnails per second: the worker's default concurrency against one process."""
    keys = _photos(root, count)
    label = f"thumbnails, {count} photos of 12 MP"
    with PeakRss(worker.pid) as rss:
        started = time.perf_counter()
        for result in [_send("make_thumbnails", key) for key in keys]:
            result.get(timeout=600)
        pooled = count / (time.perf_counter() - started)
    single = _single_process_rate(root, keys)
    return [
        common.row(label, f"worker -c {cores}", pooled, "photos/s"),
        common.row(label, "single process", single, "photos/s"),
        common.ratio(label, f"worker -c {cores} vs single process", pooled, single),
        common.row(label, "peak RSS of the worker's children together", rss.total, "MiB"),
        common.row(label, "peak RSS of the largest worker child", rss.largest, "MiB"),
    ]


def _photos(root: Path, count: int) -> list[str]:
    """`count` 12 MP JPEGs with photo-like content (a few variants, copied)."""
    from PIL import Image, ImageFilter

    variants = []
    for seed in range(4):
        noise = Image.effect_noise(PHOTO_SIZE, 40 + seed * 10).convert("RGB")
        gradient = Image.linear_gradient("L").resize(PHOTO_SIZE).convert("RGB")
        image = Image.blend(gradient, noise, 0.4).filter(ImageFilter.SMOOTH)
        path = root / f"photos/variant{seed}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=90)
        variants.append(path.read_bytes())
    keys = []
    for index in range(count):
        key = f"photos/p{index:04}.jpg"
        (root / key).write_bytes(variants[index % len(variants)])
        keys.append(key)
    return keys


def _single_process_rate(root: Path, keys: list[str]) -> float:
    """Photos per second of the same service function called in this one process."""
    from proj.files import images
    from proj.files.storage import Storage
    from proj.settings import Settings

    storage, limit = Storage(root), Settings().files_max_image_pixels
    started = time.perf_counter()
    for key in keys:
        images.make_thumbnails(storage, key, max_pixels=limit)
    return len(keys) / (time.perf_counter() - started)


if __name__ == "__main__":
    common.standalone("files", run)
