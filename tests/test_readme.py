"""The README is executable: CI runs its test command, and every ```python block runs as written on CPU."""
import pathlib
import re
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    m = re.search(r"2\. Install the test dependencies and run the tests:\s*```\s*\n(.*?)\n\s*```", readme, re.S)
    assert m, "README lost its second command"
    command = m.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# --- README test command (begin)")[1].split("# --- README test command (end)")[0]
    assert block.strip() == command


def python_blocks(text: str):
    """[(first line number of the code, section heading, code)] of every ```python block in ``text``."""
    blocks, heading, lines, i = [], "(top)", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            start, body = i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start, heading, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "the README's usage examples disappeared (or lost their ```python tag)"


@pytest.mark.parametrize("line,heading,code", BLOCKS, ids=[f"line{n}-{h[:30]}" for n, h, _ in BLOCKS])
def test_readme_python_block_runs(line, heading, code, tmp_path, monkeypatch):
    """Each block runs as written, alone, in an empty folder (it may write files there), on CPU."""
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except Exception as e:  # noqa: BLE001 -- any failure of a user-facing example is a test failure
        tb = traceback.format_exc(limit=-3)
        pytest.fail(f"README.md ```python block at line {line} (section '{heading}') does not run as written: "
                    f"{type(e).__name__}: {e}\n{tb}", pytrace=False)
