"""The push path's thin Lambda: a terminate lifecycle event in, one SSM command out.

Deployed alone (only boto3 and the standard library), so it must not import
`instance_agent`; the version below is kept equal to the agent's by a test.
"""

from __future__ import annotations

__version__ = "0.1.0"
