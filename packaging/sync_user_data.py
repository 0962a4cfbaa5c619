#!/usr/bin/env python3
"""Copy packaging/user-data.sh's body into template.yaml's UserData, so one script serves both.

    python3 packaging/sync_user_data.py          # rewrite the template's copy
    python3 packaging/sync_user_data.py --check  # exit 1 if the copies differ

The body is everything after the `# --- end of settings` line. The template keeps its own
settings (filled in by CloudFormation's Fn::Sub) and takes the body as a plain literal
joined after them, so the shell's `${…}` never meets Fn::Sub. tests/test_template.py checks
that the two stay identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "user-data.sh"
TEMPLATE = HERE / "template.yaml"
END_OF_SETTINGS = "# --- end of settings"
BEGIN = "# BEGIN user-data body"
END = "# END user-data body"
INDENT = " " * 16  # the literal's indentation in the template


def body(script: str) -> str:
    """The part of a user-data script after its settings."""
    _, marker, rest = script.partition(END_OF_SETTINGS)
    if not marker:
        raise ValueError("no '# --- end of settings' line")
    return rest.split("\n", 1)[1]


def render(template: str, script_body: str) -> str:
    """`template` with the literal between the BEGIN and END markers replaced."""
    start = template.index(BEGIN)
    start = template.index("\n", start) + 1
    end = template.rindex("\n", 0, template.index(END)) + 1
    lines = [f"{INDENT[:-2]}- |"]
    lines += [f"{INDENT}{line}" if line else "" for line in script_body.rstrip("\n").split("\n")]
    return template[:start] + "\n".join(lines) + "\n" + template[end:]


def main(argv: list[str]) -> int:
    template = TEMPLATE.read_text(encoding="utf-8")
    wanted = render(template, body(SCRIPT.read_text(encoding="utf-8")))
    if "--check" in argv:
        if wanted != template:
            sys.stderr.write("template.yaml's user data differs from user-data.sh: run "
                             "python3 packaging/sync_user_data.py\n")
            return 1
        return 0
    TEMPLATE.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
