"""Temporary staging folders (``<name>.tmp-<token>``) and the removal of stale ones.

Outputs are written to a temporary sibling and renamed into place. A run that is killed
(SIGKILL, a lost VM) cannot clean up, so the next run over the same output removes what such
runs left: a temporary whose name says it belongs to a process of this host that no longer
runs, or any temporary untouched for ``STALE_AFTER_S`` (other hosts, older name formats).
A temporary of a live run is never touched.

Paths go through ``tf.io.gfile`` when remote (``gs://``), plain ``os`` otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid

#: A temporary left this long without change is stale whoever wrote it.
STALE_AFTER_S = 24 * 3600



def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def temp_token() -> str:
    """``<host>~<pid>~<random>``: tells a later run whether the writer still lives."""
    return f"{_host()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remote(path: str) -> bool:
    return "://" in path


def _age_s(path: str) -> float:
    if _remote(path):
        import tensorflow as tf

        return time.time() - tf.io.gfile.stat(path).mtime_nsec / 1e9
    return time.time() - os.path.getmtime(path)


def is_stale(path: str) -> bool:
    """Whether the temporary ``path`` was left by a run that has ended."""
    # "<prefix>-<host>~<pid>~<random>": the host cannot be told from the prefix by a pattern
    # (both may hold "-" and "."), so compare the end of the head with this host's name.
    parts = os.path.basename(path.rstrip("/")).rsplit("~", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[0].endswith(f"-{_host()}"):
        return not _alive(int(parts[1]))
    try:
        return _age_s(path) > STALE_AFTER_S
    except (OSError, ValueError):
        return False


def _listdir(parent: str) -> list[str]:
    if _remote(parent):
        import tensorflow as tf

        return (
            [n.rstrip("/") for n in tf.io.gfile.listdir(parent)]
            if tf.io.gfile.isdir(parent)
            else []
        )
    return os.listdir(parent) if os.path.isdir(parent) else []


def _remove(path: str) -> None:
    if _remote(path):
        import tensorflow as tf

        tf.io.gfile.rmtree(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


def remove_stale(parent: str, prefix: str) -> list[str]:
    """Removes the stale temporaries ``<parent>/<prefix>*``; returns what was removed."""
    removed = []
    for name in sorted(_listdir(parent)):
        if not name.startswith(prefix):
            continue
        path = os.path.join(parent, name)
        if is_stale(path):
            try:
                _remove(path)
            except OSError:
                continue  # another run removed it first
            removed.append(path)
    return removed
