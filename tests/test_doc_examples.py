"""Every shell example in README.md and docs/*.md marked runnable runs and exits 0.

The marker is a line `<!-- runnable -->` (invisible when rendered) right before a
```sh fence. Each block runs with bash (`-e -o pipefail`), as the reader would paste
it: in a directory holding the checkout's files and `.venv` (this Python's), with
the installed commands on PATH and no RELAY_* variable, against `sysmail-relay serve`
started as the README starts it (no configuration: the built-in outbox), on a
temporary state directory (the caller's default, $XDG_STATE_HOME) and a free port.
The examples find that daemon as cron's sendmail would, through the state directory.
A message an example sends (a `Subject:` it writes) must reach the outbox.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.settings import DEFAULT_CONFIG_FILE
from relay.spool import state
from tests.support import free_port, relay_command, stop_process

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Example:
    where: str
    script: str

    @property
    def subjects(self) -> list[str]:
        """The subjects of the messages the example sends."""
        return re.findall(r"Subject: ([^\\\n'\"]+)", self.script)


def runnable_examples() -> list[Example]:
    found: list[Example] = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARKER:
                continue
            fence = _FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            assert fence and fence.group(1) == "sh", (
                f"{doc.name}:{i + 1}: {MARKER} must be followed by a ```sh block")
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            found.append(Example(f"{doc.relative_to(ROOT)}:{i + 3}",
                                 "\n".join(lines[i + 2:end]) + "\n"))
    return found


EXAMPLES = runnable_examples()


@dataclass
class Reader:
    """The reader's shell: where examples run, and the daemon they talk to."""

    cwd: Path
    env: dict[str, str]
    outbox: Path
    log: Path


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RELAY_") and k not in ("STATE_DIRECTORY",
                                                        "CREDENTIALS_DIRECTORY")}
    bin_dir = str(Path(relay_command()).parent)
    return {**env, "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"}


def checkout_copy(where: Path) -> Path:
    """A directory with the checkout's files (links) and `.venv` as this Python's."""
    where.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", ".git"):
            (where / entry.name).symlink_to(entry)
    (where / ".venv").symlink_to(Path(relay_command()).parent.parent)
    return where


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    if DEFAULT_CONFIG_FILE.exists():
        pytest.fail(f"{DEFAULT_CONFIG_FILE} exists on this host: the examples run without "
                    "a configuration and would read it")
    base = tmp_path_factory.mktemp("doc-examples")
    env = clean_env(base / "home")
    state_dir = base / "home" / "state" / "sysmail-relay"
    log = base / "relay.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [relay_command(), "serve"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            env={**env, "RELAY_LISTENER__PORT": str(free_port()), "RELAY_ADMIN__PORT": "0"})
    try:
        deadline = time.monotonic() + 20
        while (holder := state.serving(state_dir)) is None or not holder.listener:
            assert daemon.poll() is None, f"serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{log.read_text()}"
            time.sleep(0.05)
        yield Reader(checkout_copy(base / "checkout"), env, state_dir / "outbox" / "new", log)
    finally:
        stop_process(daemon)


def test_the_docs_mark_the_examples_a_reader_can_run() -> None:
    where = {example.where.split(":")[0] for example in EXAMPLES}
    assert {"README.md", "docs/operations.md", "docs/metrics.md"} <= where
    assert any("sysmail-sendmail -t" in example.script for example in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_runnable_example_exits_0(reader: Reader, example: Example) -> None:
    before = set(reader.outbox.iterdir()) if reader.outbox.is_dir() else set()
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", example.script],
                          cwd=reader.cwd, env=reader.env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, (
        f"{example.where} exited {done.returncode}\n--- script\n{example.script}"
        f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}--- relay log\n"
        f"{reader.log.read_text(errors='replace')[-3000:]}")
    deadline = time.monotonic() + 20
    for subject in example.subjects:
        wanted = f"\nSubject: {subject}".encode()
        while not any(wanted in p.read_bytes() for p in set(reader.outbox.iterdir()) - before):
            assert time.monotonic() < deadline, (
                f"{example.where}: the message {subject!r} did not reach the outbox\n"
                f"{done.stdout}{done.stderr}")
            time.sleep(0.05)


def test_an_example_that_fails_is_reported(reader: Reader) -> None:
    """The runner sees a failure in the middle of a block and in a pipeline, such as the
    README's example before it named a recipient (sendmail exits 64)."""
    for script in ("true\nfalse\ntrue\n", "false | cat\n",
                   'echo "Subject: cron" | .venv/bin/sysmail-sendmail -t\n'):
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=reader.cwd,
                              env=reader.env, capture_output=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert done.returncode != 0, script

