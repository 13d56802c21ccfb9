"""--overwrite without losing anything: old outputs are moved aside, and deleted only once the new run succeeds.

A failed or refused run (a bad value found late, a crash, Ctrl+C) puts them back. After a SIGKILL they stay
in the hidden sibling `.NAME.anterior`; the next run that sets the same path aside keeps that older copy
(it is the last known good one) and drops the partial newer outputs instead.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def aside_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.anterior")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def discard_leftovers(paths: Iterable[Path]) -> None:
    """Delete copies a killed run left aside, once a later run has produced what replaces them."""
    for path in paths:
        aside = aside_path(Path(path))
        if aside.exists() or aside.is_symlink():
            _remove(aside)


@contextmanager
def set_aside(paths: Iterable[Path]) -> Iterator[list[Path]]:
    """Move each existing path to its aside sibling; restore them if the block raises, delete them if not."""
    moved: list[Path] = []
    for path in paths:
        path = Path(path)
        aside = aside_path(path)
        if aside.exists():
            # A copy left by a killed run is older than what sits at `path` now: keep it, drop the newer one.
            if path.exists():
                _remove(path)
            moved.append(path)
        elif path.exists() or path.is_symlink():
            os.replace(path, aside)
            moved.append(path)
    try:
        yield moved
    except BaseException:
        for path in moved:
            if path.exists() or path.is_symlink():
                _remove(path)
            os.replace(aside_path(path), path)
        raise
    for path in moved:
        _remove(aside_path(path))
