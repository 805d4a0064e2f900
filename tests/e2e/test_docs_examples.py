"""Every shell and Python block of README.md and docs/ runs as written against a real local stack.

A block runs in a bash that sourced the stack's `stack.env`, from a folder whose `.local` and `.venv`
are the stack's and the project's, as in a clone after `make run`. A block that cannot run there says
so in the Markdown, on the line before it, and why (a reader sees the reason too):

    <!-- example: not run: make run is what the stack of this test is -->

and one that needs files in storage names them, so the test puts real ones there first:

    <!-- example: files receipts/42.pdf uploads/a.jpg -->
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.localstack import LocalStack
from tests.filefactory import photo, zip_of
from tests.harness import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = ("sh", "bash", "python")
# Blocks of these languages are text to read (output, configuration), not commands.
READ_ONLY = ("", "text", "yaml", "toml", "ini", "json", "promql", "diff")
MARKER = re.compile(r"<!--\s*example:\s*(?P<kind>not run|files)\s*:?\s*(?P<text>.*?)\s*-->")
FENCE = re.compile(r"^```(?P<info>[\w-]*)\s*$")
BLOCK_TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and the marker before it."""

    path: Path
    line: int
    lang: str
    text: str
    marker: str | None  # "not run" or "files"
    marker_text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, each with the marker comment just before it."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before)
        found.append(
            Block(
                path,
                i + 1,
                fence["info"],
                "\n".join(lines[i + 1 : end]) + "\n",
                marker["kind"] if marker else None,
                marker["text"] if marker else "",
            )
        )
        i = end + 1
    return found


def documented_blocks() -> list[Block]:
    """Every fenced block of README.md and docs/*.md."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [b for p in paths for b in blocks_of(p)]


BLOCKS = [b for b in documented_blocks() if b.lang in RUN]


def test_every_block_is_a_command_or_text_to_read() -> None:
    unknown = [f"{b.name} ({b.lang})" for b in documented_blocks() if b.lang not in (*RUN, *READ_ONLY)]
    assert not unknown, f"blocks in a language this test neither runs nor knows as text: {unknown}"


def test_every_block_that_is_not_run_says_why() -> None:
    unexplained = [b.name for b in BLOCKS if b.marker == "not run" and len(b.marker_text) < 10]
    assert not unexplained, f"blocks marked not run without a reason: {unexplained}"


@pytest.fixture(scope="module")
def workdir(local_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like the clone after `make run`: its .local is the stack's, its .venv ours."""
    folder = tmp_path_factory.mktemp("clone")
    (folder / ".local").symlink_to(local_stack.local_dir)
    (folder / ".venv").symlink_to(ROOT / ".venv")
    return folder


def _put_files(block: Block, local_stack: LocalStack) -> None:
    """Real files at the keys the block's marker names, of the kind their suffix says."""
    root = Path(local_stack.exports()["FILES_ROOT"])
    for key in block.marker_text.split():
        target = root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        if key.endswith((".jpg", ".jpeg")):
            photo(target)
        elif key.endswith(".zip"):
            zip_of(target, {"readme.txt": b"hello\n", "data/n.csv": b"a,b\n1,2\n"})
        elif key.endswith(".csv"):
            target.write_text("name,amount\nann,3\nbob,4.5\n")
        else:
            target.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")


def _command(block: Block) -> str:
    if block.lang == "python":
        return f"python - <<'PROJ_EXAMPLE'\n{block.text}PROJ_EXAMPLE\n"
    return block.text


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker != "not run"], ids=lambda b: b.name)
def test_block_runs_as_written(block: Block, local_stack: LocalStack, workdir: Path) -> None:
    if block.marker == "files":
        _put_files(block, local_stack)
    script = f"set -eo pipefail\nsource .local/stack.env\n{_command(block)}"
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=workdir,
        env=local_stack._shell_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert done.returncode == 0, (
        f"{block.name} ({block.lang}) exited {done.returncode}\n--- block\n{block.text}"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
