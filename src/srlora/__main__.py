"""``python -m srlora``: the ``srlora`` command, which lives in the lab.

Install it with ``pip install "srlora[lab]"``.
"""

import sys

try:
    from srlora_lab.cli import main
except ImportError as e:  # the library was installed without the lab
    sys.exit(f"srlora: the command-line tools are in the lab: pip install 'srlora[lab]' ({e})")

sys.exit(main())
