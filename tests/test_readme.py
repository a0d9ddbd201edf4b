"""The README's Serving examples run, in order and twice, against a live demo server, and answer as documented.

Every ```bash block of the README's "Serving" section is a list of commands, each followed by what
it answers: ``# -> 201 {json pattern}`` (curl: HTTP status and key fields) or ``# -> exit 0
`text` ...`` (other commands: exit status and substrings of the output). In a pattern, ``...`` is
any value (or, closing a list, any further items), a number stands for any number, objects may hold
more keys than shown, and strings, booleans and nulls must be equal. The server is the real
``promptdistill serve`` (as ``make serve`` starts it) on the session's demo bundle.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import ServerProcess, start_server, stop_server
from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

ANY, MORE = "<readme: any value>", "<readme: more items>"  # what `...` becomes in a pattern
HTTP_STATUS = "readme-test-http-status:"
# curl on PATH reports each answer's status on stderr; the commands stay exactly as the README shows them
CURL_SHIM = "#!/bin/sh\nexec {curl} --write-out '%{{stderr}}" + HTTP_STATUS + '%{{http_code}}\\n\' "$@"\n'


@dataclass
class Example:
    line: int  # in README.md
    command: str
    expect: str


def serving_examples(text: str) -> list[Example]:
    """Commands and their documented answers, in README order (the ```bash blocks of "## Serving")."""
    start = text.index("\n## Serving\n")
    end = text.index("\n## ", start + 1)
    examples: list[Example] = []
    for block in re.finditer(r"^```bash\n(.*?)^```$", text[start:end], re.DOTALL | re.MULTILINE):
        first_line = text[: start + block.start(1)].count("\n") + 1
        examples += _parse_block(block.group(1).splitlines(), first_line)
    return examples


def _parse_block(lines: list[str], first_line: int) -> list[Example]:
    examples: list[Example] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# -> "):
            assert examples and not examples[-1].expect, f"README.md:{first_line + i}: an answer without a command"
            expect = [line[len("# -> ") :]]
            while i + 1 < len(lines) and re.match(r"#\s{2,}\S", lines[i + 1]):  # continuation lines
                i += 1
                expect.append(lines[i][1:].strip())
            examples[-1].expect = " ".join(expect)
        elif line.strip() and not line.startswith("#"):
            start, command = i, [line]
            while not _complete("\n".join(command)):
                i += 1
                command.append(lines[i])
            examples.append(Example(first_line + start, "\n".join(command), ""))
        i += 1
    for ex in examples:
        assert ex.expect, f"README.md:{ex.line}: `{ex.command[:60]}` does not say what it answers (# -> ...)"
    return examples


def _complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def parse_pattern(text: str) -> Any:
    """A documented JSON answer -> a value for :func:`matches` (``...`` -> ANY / MORE)."""
    text = re.sub(r"\{\s*\.\.\.\s*\}", "{}", text)  # {...}: any object
    text = re.sub(r",\s*\.\.\.\s*\}", "}", text)  # objects are open anyway
    text = re.sub(r"(\[|,)\s*\.\.\.\s*\]", lambda m: f'{m.group(1)} "{MORE}"]', text)
    text = re.sub(r":\s*\.\.\.", f': "{ANY}"', text)
    return json.loads(text)


def matches(got: Any, want: Any, where: str = "$") -> list[str]:
    """Where ``got`` differs from the pattern ``want`` (empty: it matches)."""
    if want == ANY:
        return []
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{where}: expected an object, got {got!r}"]
        problems = [f"{where}.{k}: missing" for k in want if k not in got]
        return problems + [p for k, v in want.items() if k in got for p in matches(got[k], v, f"{where}.{k}")]
    if isinstance(want, list):
        more = bool(want) and want[-1] == MORE
        items = want[:-1] if more else want
        if not isinstance(got, list) or (len(got) < len(items) if more else len(got) != len(items)):
            return [f"{where}: expected {'at least ' if more else ''}{len(items)} items, got {got!r}"]
        return [p for i, w in enumerate(items) for p in matches(got[i], w, f"{where}[{i}]")]
    if isinstance(want, int | float) and not isinstance(want, bool):
        ok = isinstance(got, int | float) and not isinstance(got, bool)
        return [] if ok else [f"{where}: expected a number, got {got!r}"]
    return [] if got == want else [f"{where}: expected {want!r}, got {got!r}"]


def check(example: Example, proc: subprocess.CompletedProcess[str]) -> list[str]:
    """Problems with one command's answer (empty: it answered as documented)."""
    m = re.fullmatch(r"(exit )?(\d+)\s*(.*)", example.expect)
    assert m, f"README.md:{example.line}: cannot read the documented answer {example.expect!r}"
    is_exit, status, rest = bool(m.group(1)), int(m.group(2)), m.group(3).strip()
    statuses = [int(s) for s in re.findall(re.escape(HTTP_STATUS) + r"(\d+)", proc.stderr)]
    problems = []
    if is_exit and proc.returncode != status:
        problems.append(f"exit status {proc.returncode}, documented {status}")
    if not is_exit and (proc.returncode != 0 or statuses != [status]):
        problems.append(f"HTTP status {statuses} (curl exit {proc.returncode}), documented {status}")
    if rest.startswith(("{", "[")):
        try:
            got = json.loads(proc.stdout)
        except ValueError:
            return [*problems, f"answer is not JSON: {proc.stdout[:300]!r}"]
        problems += matches(got, parse_pattern(rest))
    else:
        problems += [f"output lacks {s!r}" for s in re.findall(r"`([^`]+)`", rest) if s not in proc.stdout]
    return problems


@pytest.fixture(scope="module")
def demo_server(demo_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``promptdistill serve`` on the demo bundle, as ``make serve`` runs it (default backend: auto)."""
    out, _ = demo_run
    grpc_port = free_port()  # the README's gRPC example talks to it as $G
    env = {"PROMPTDISTILL_GRPC_PORT": str(grpc_port)}
    server = start_server(out / "bundle", tmp_path_factory.mktemp("readme-server"), env=env)
    try:
        yield server
    finally:
        stop_server(server)


def test_serving_section_is_parsed() -> None:
    examples = serving_examples(README.read_text())
    assert sum("curl " in ex.command for ex in examples) >= 15
    assert sum(ex.command.startswith("promptdistill ") for ex in examples) >= 4
    assert matches({"a": [1, 2, 3], "b": "x", "c": None}, parse_pattern('{"a": [0, ...], "b": "x", "c": ...}')) == []
    assert matches({"a": [1]}, parse_pattern('{"a": [0, 0]}')) and matches({"b": "y"}, parse_pattern('{"b": "x"}'))


@pytest.mark.slow  # builds the demo (about a minute) once per session, then a server on it
def test_readme_serving_examples_answer_as_documented(demo_server: ServerProcess, tmp_path: Path) -> None:
    examples = serving_examples(README.read_text())
    shim = tmp_path / "bin" / "curl"
    shim.parent.mkdir()
    curl = subprocess.run(["sh", "-c", "command -v curl"], capture_output=True, text=True).stdout.strip()
    assert curl, "the README's examples need curl (apt-get install curl)"
    shim.write_text(CURL_SHIM.format(curl=curl))
    shim.chmod(0o755)
    path = os.pathsep.join([str(shim.parent), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTDISTILL_")}
    grpc_address = f"127.0.0.1:{demo_server.env['PROMPTDISTILL_GRPC_PORT']}"
    env.update({"B": demo_server.url, "G": grpc_address, "PATH": path, "PYTHONPATH": str(ROOT)})
    work = tmp_path / "work"  # the examples' files (cat.jpg) live here
    work.mkdir()
    for run in (1, 2):  # the second run proves the examples can be re-run
        for ex in examples:
            proc = subprocess.run(
                ["bash", "-c", ex.command], cwd=work, env=env, capture_output=True, text=True, timeout=120
            )
            problems = check(ex, proc)
            assert not problems, (
                f"run {run}, README.md:{ex.line}: `{ex.command}` did not answer as documented "
                f"({ex.expect}):\n  " + "\n  ".join(problems) + f"\nstdout: {proc.stdout[:1500]}\n"
                f"stderr: {proc.stderr[-1500:]}\nserver:\n{demo_server.output()[-1500:]}"
            )
