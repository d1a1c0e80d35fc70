"""Staged writes: every output is written to a temporary sibling and renamed into place.

One helper for each shape of output: :func:`write_text` / :func:`write_json` /
:func:`write_bytes` for small files, :func:`staged_file` for writers that need a path (a plot,
an h5 file), :func:`staged_dir` for folders (prepared data, a model dir, an export version).
Readers never see half an output, and a failed write leaves what was there before.

A run that is killed (SIGKILL, a lost VM) cannot clean up, so the next run over the same
output removes what such runs left: a temporary whose name says it belongs to a process of
this host that no longer runs, or any temporary untouched for ``STALE_AFTER_S`` (other hosts,
older name formats). A temporary of a live run is never touched.

Paths go through ``tf.io.gfile`` when remote (``gs://``), plain ``os`` otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

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


def _gfile():
    import tensorflow as tf  # only for remote paths: local writes stay TensorFlow-free

    return tf.io.gfile


def _exists(path: str) -> bool:
    return _gfile().exists(path) if _remote(path) else os.path.exists(path)


def _rename(source: str, target: str, overwrite: bool) -> None:
    if _remote(source):
        _gfile().rename(source, target, overwrite=overwrite)
    elif overwrite:
        os.replace(source, target)
    elif os.path.exists(target):
        raise FileExistsError(f"{target} exists")
    else:
        os.rename(source, target)


def _remove_quietly(path: str) -> None:
    try:
        if _exists(path):
            _remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def staged_file(path: str, *, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renamed onto ``path`` when the block succeeds.

    ``overwrite=False`` raises ``FileExistsError`` when ``path`` exists by then. Remote paths
    (``gs://``) go through ``tf.io.gfile``; parent folders are created.
    """
    folder, name = os.path.split(path)
    folder = folder or "."
    if _remote(path):
        _gfile().makedirs(folder)
    else:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{name}")
    try:
        yield tmp
        _rename(tmp, path, overwrite)
    finally:
        _remove_quietly(tmp)


def write_bytes(path: str, data: bytes, *, overwrite: bool = True) -> None:
    """Writes ``data`` to ``path`` through a temporary sibling."""
    with staged_file(path, overwrite=overwrite) as tmp:
        if _remote(tmp):
            with _gfile().GFile(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)


def write_text(path: str, text: str, *, overwrite: bool = True) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary sibling."""
    write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str, value: object, *, overwrite: bool = True) -> None:
    """Writes ``value`` as indented JSON to ``path`` through a temporary sibling."""
    write_text(path, json.dumps(value, indent=2) + "\n", overwrite=overwrite)


@contextlib.contextmanager
def staged_dir(final: str, *, replace: bool = False, prefix: str | None = None) -> Iterator[str]:
    """Yields a temporary folder beside ``final``; renamed to ``final`` when the block succeeds.

    The temporary is ``<parent>/<prefix><host>~<pid>~<random>`` (``prefix`` defaults to
    ``"<name>.tmp-"``), so a later run can tell it was left by a killed one; stale ones with the
    same prefix are removed first. With ``replace`` an existing ``final`` is moved aside and
    removed only after the rename; without it an existing ``final`` raises ``FileExistsError``
    and stays as it is. On GCS a folder rename is not atomic: write a completion marker last.
    """
    final = final.rstrip("/")
    parent, name = os.path.split(final)
    parent = parent or "."
    prefix = prefix if prefix is not None else f"{name}.tmp-"
    remove_stale(parent, prefix)
    tmp = os.path.join(parent, prefix + temp_token())
    if _remote(tmp):
        _gfile().makedirs(tmp)
    else:
        os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if _exists(final):
            if not replace:
                raise FileExistsError(f"{final} exists; not overwriting it")
            old = os.path.join(parent, f".old-{name}-{uuid.uuid4().hex[:8]}")
            _rename(final, old, overwrite=False)
        _rename(tmp, final, overwrite=False)
        if old:
            _remove_quietly(old)
    finally:
        _remove_quietly(tmp)
