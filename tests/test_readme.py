"""The README's first example runs as written."""

import ast
import os
import re
import textwrap
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_first_readme_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 switches at steps [5, 10, 15, 20, 25, 30]" in out.stdout
    assert "directions used per module: [32, 32]" in out.stdout


def test_readme_example_is_the_quickstart_file():
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "examples" / "quickstart.py").read_text().strip() in readme


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _tested_examples() -> dict:
    """examples/*.py that a test runs (named in a tests/*.py file), by name -> text."""
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    return {
        p.name: p.read_text()
        for p in (ROOT / "examples").glob("*.py")
        if p.name in tests or p.stem in tests
    }


def _statements(code: str, nested: bool) -> list[str]:
    """The statements of ``code`` as AST dumps (so line breaks, comments and formatting do not
    matter): the top-level ones, or (``nested``) every statement at any depth."""
    tree = ast.parse(textwrap.dedent(code))
    nodes = ast.walk(tree) if nested else tree.body
    return [ast.dump(n) for n in nodes if isinstance(n, ast.stmt)]


def test_every_other_readme_snippet_is_an_excerpt_of_a_tested_example():
    examples = {
        name: set(_statements(text, nested=True)) for name, text in _tested_examples().items()
    }
    for block in _python_blocks()[1:]:
        wanted = _statements(block, nested=False)
        assert wanted, block
        found = [name for name, stmts in examples.items() if all(w in stmts for w in wanted)]
        assert found, f"README snippet not taken from a tested example:\n{block}"


def test_every_srlora_command_in_the_readme_parses():
    from srlora_lab.cli import build_parser

    text = (ROOT / "README.md").read_text()
    cmds = [
        ln.split("#")[0].strip()
        for b in re.findall(r"```bash\n(.*?)```", text, re.S)
        for ln in b.splitlines()
        if ln.strip().startswith("srlora ")
    ]
    assert len(cmds) >= 4
    parser = build_parser()
    for c in cmds:
        parser.parse_args(c.split()[1:])  # exits (SystemExit) on an unknown flag or value


def test_checkpoint_export_example_resumes_bitwise_and_exports_exactly():
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "checkpoint_export.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    assert "resumed run bitwise equal: True" in line and "6 switches" in line
    rel = [float(x) for x in re.findall(r"difference ([0-9.e+-]+); merged ([0-9.e+-]+)", line)[0]]
    assert max(rel) < 1e-4
