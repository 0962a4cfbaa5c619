"""One option's value from a flag, an environment variable (text) or the TOML file, converted
to the option's kind strictly (no truncated integers, no infinite timeouts) and checked."""

from __future__ import annotations

import math
import re
import threading
from typing import Any

from instance_agent.configkey import Option
from instance_agent.errors import ConfigError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 1073741824, 500MiB, 1TiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def from_text(opt: Option, text: str) -> Any:
    """Convert an env value (always text) to the option's type."""
    if opt.kind == "bool":
        low = text.strip().lower()
        if low in ("1", "true"):
            return True
        if low in ("0", "false"):
            return False
        raise ValueError(f"expected 1/0/true/false, got {text!r}")
    if opt.kind == "pathlist":
        return tuple(p for p in text.split(":") if p)
    if opt.kind == "list":
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return from_native(opt, text)


def from_native(opt: Option, value: Any) -> Any:
    """Convert a TOML (or already-typed) value to the option's type, strictly."""
    kind = opt.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind in ("list", "pathlist"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return tuple(value)
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float):  # int() would truncate TOML's `level = 3.9` to 3
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, str):
            value = value.strip()
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        number = float(value)
        # inf and nan pass every comparison-based check (or fail it obscurely) and then break
        # time.sleep()/Event.wait() at the worst moment.
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        # Event.wait() and Lock.acquire() refuse timeouts above this with OverflowError.
        if number > threading.TIMEOUT_MAX:
            raise ValueError(f"expected at most {threading.TIMEOUT_MAX:g}, got {value!r}")
        return number
    if kind == "size":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a size, got {value!r}")
        return int(value) if isinstance(value, (int, float)) else parse_size(str(value))
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if kind == "choice" and value not in opt.choices:
        raise ValueError(f"expected one of {', '.join(opt.choices)}, got {value!r}")
    return value


def checked(opt: Option, value: Any, origin: str) -> Any:
    if value is None or opt.check is None:
        return value
    problem = opt.check(value)
    if problem:
        raise ConfigError(f"{origin}: {problem}")
    return value
