"""The library stands apart from the lab: ``import srlora`` loads no lab, plotting or experiment
module, and no file of the library names the lab."""

import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def test_import_srlora_loads_no_lab_module():
    code = (
        "import sys, srlora, srlora.integrations.trainer, srlora.distributed\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('srlora_lab', 'matplotlib', 'datasets', 'pandas'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(SRC), "PATH": ""},
    )
    assert out.stdout.strip() == "", f"import srlora loaded lab modules: {out.stdout.strip()}"


def test_no_library_file_imports_the_lab():
    offenders = []
    for p in (SRC / "srlora").rglob("*.py"):
        if p.name == "__main__.py":  # `python -m srlora` hands over to the lab's command
            continue
        if "srlora_lab" in p.read_text():
            offenders.append(str(p.relative_to(SRC)))
    assert offenders == []
