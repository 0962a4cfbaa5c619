"""SSM document parameters as the API and the SSM agent check them, for local.ssm.

`compile_pattern` turns an allowedPattern into the Python regex that behaves like Go's (the
SSM agent) or Java's; `check_parameters` refuses what SendCommand refuses: an unknown
document, a parameter the document does not declare or lacks, and a value its
allowedPattern does not admit (Go semantics).
"""

from __future__ import annotations

import re
from typing import Any

from moto.core.exceptions import ServiceException
from moto.ssm.models import SimpleSystemManagerBackend


class SSMError(ServiceException):
    """An SSM error rendered the way AWS renders it (HTTP 400, `__type` = code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


def compile_pattern(pattern: str, semantics: str = "go") -> re.Pattern[str]:
    """`pattern` as Python would have to write it to behave like Go's regexp ("go", the
    SSM agent) or java.util.regex ("java"), both used with search (find) semantics.

    Without the m flag, Go's `$` matches only at the end of the text, like `\\z`; Java's
    `$` also matches before a final line terminator. Both know `\\z`. Go has no `\\Z`
    and no look-arounds, so such a pattern raises ValueError. Classes are ASCII in both.
    """
    if semantics not in ("go", "java"):
        raise ValueError(f"unknown semantics {semantics!r}")
    if re.search(r"\(\?<?[=!]", pattern):
        raise ValueError(f"look-arounds are not supported by Go: {pattern!r}")
    dollar = r"\Z" if semantics == "go" else r"(?=(?:\r\n|[\n\r\x85\u2028\u2029])?\Z)"
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if not in_class and escaped == "z":
                out.append(r"\Z")
            elif not in_class and escaped == "Z":
                if semantics == "go":
                    raise ValueError(f"\\Z is not supported by Go: {pattern!r}")
                out.append(dollar)
            else:
                out.append(char + escaped)
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            # A `]` right after `[` or `[^` is a literal member, not the end of the class.
            j = i + 1 + (pattern[i + 1 : i + 2] == "^")
            if pattern[j : j + 1] == "]":
                out.append(pattern[i : j + 1])
                i = j + 1
                continue
        elif char == "$":
            out.append(dollar)
            i += 1
            continue
        out.append(char)
        i += 1
    return re.compile("".join(out), re.ASCII)


def check_parameters(
    backend: SimpleSystemManagerBackend, document_name: str, parameters: dict[str, list[str]]
) -> None:
    documents = backend._documents.get(document_name)
    if not documents:
        raise SSMError("InvalidDocument", f"Document {document_name} does not exist")
    declared: dict[str, Any] = documents.get_default_version().content_json.get("parameters") or {}
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise SSMError(
            "InvalidParameters", f"Document {document_name} does not support parameters: {', '.join(unknown)}"
        )
    for name, spec in declared.items():
        values = parameters.get(name)
        if values is None:
            if "default" not in spec:
                raise SSMError("InvalidParameters", f"Parameter {name} is required")
            continue
        if spec.get("type", "String") == "String" and len(values) != 1:
            raise SSMError("InvalidParameters", f"Parameter {name} takes exactly one value")
        pattern = spec.get("allowedPattern")
        if pattern is None:
            continue
        regex = compile_pattern(str(pattern), "go")
        for value in values:
            if not regex.search(value):
                raise SSMError(
                    "InvalidParameters",
                    f'Parameter "{name}" value failed to satisfy constraint: allowedPattern {pattern}',
                )
