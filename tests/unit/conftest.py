"""The fast layer: in-process, no servers, a fake clock. Importable helpers live in fakes.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
