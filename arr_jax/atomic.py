"""Small state files written atomically and validated on read (no JAX import: launchers use it).

Reports, run descriptions, sweep status files and cache entries are read back as state or as
completion markers; `atomic_write_text` never leaves half a file under the final name, and
`read_json` never takes a truncated file as complete.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, flushed and fsynced,
    then renamed over ``path``. A killed process leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kw) -> Path:
    """`atomic_write_text` of ``json.dumps(obj, **dump_kw)``."""
    return atomic_write_text(path, json.dumps(obj, **dump_kw))


def read_json(path: str | os.PathLike, *, required: tuple[str, ...] = (), default: Any = FileNotFoundError) -> Any:
    """A JSON file read back as state, validated: it must parse (a truncated file does not) and, when
    ``required`` is given, be an object with those keys. A missing or invalid file returns ``default``
    when one is given (with a warning naming the file for an invalid one), else raises ValueError /
    FileNotFoundError naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if required and (not isinstance(obj, dict) or any(k not in obj for k in required)):
            raise ValueError(f"lacks the keys {[k for k in required if not isinstance(obj, dict) or k not in obj]}")
        return obj
    except FileNotFoundError:
        if default is FileNotFoundError:
            raise
        return default
    except (ValueError, UnicodeDecodeError) as e:
        if default is FileNotFoundError:
            raise ValueError(f"{path} is not a complete JSON file ({e}); delete it to have it written again") from e
        log.warning("ignoring %s: not a complete JSON file (%s)", path, e)
        return default
