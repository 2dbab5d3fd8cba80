import sys

from srlora.cli import main

sys.exit(main())
