"""The memory child: ``python -m srlora_lab.bench '<json spec>'`` prints one JSON line."""

import json
import sys

from .memory import memory_child

print(json.dumps(memory_child(json.loads(sys.argv[1]))))
