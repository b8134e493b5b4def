"""The README's test command is what CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"2\. Install the test dependencies and run the tests:\s*```\s*\n(.*?)\n\s*```", readme, re.S)
    assert m, "README lost its second command"
    command = m.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# --- README test command (begin)")[1].split("# --- README test command (end)")[0]
    assert block.strip() == command
