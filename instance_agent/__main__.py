"""`python -m instance_agent` is the same as the `instance-agent` console script."""

from __future__ import annotations

import sys

from instance_agent.cli import main

sys.exit(main())
