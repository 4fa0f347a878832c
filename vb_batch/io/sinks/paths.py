"""Paths inside an output are real: vb_batch never follows a link out of an output.

Every path vb_batch deletes, moves, writes or trusts inside a local output must
be a real file or folder inside it: `_vb/` and everything under it (marker,
lease, commit records, intents, staging), the data files (`part-*.parquet`),
`_SUCCESS` and the report, and the table format's own folders (`_delta_log/`;
Iceberg's `data/` and `metadata/`). A symbolic link there (`_vb` pointing at
another folder, a part file or a staging folder that is a link) would let a
run delete, move or write files elsewhere, or trust records written elsewhere;
a file vb_batch writes with a second hard link would let a write into it
change that other file. `check_real_paths` refuses such an output with a
`ConfigError` naming the path, before anything is touched; nothing is
followed or removed. The output folder itself may be reached through a link:
that is the user's own spelling of where it is.

Object stores have neither symbolic nor hard links: only local outputs are checked.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from vb_batch.config import ConfigError
from vb_batch.io.lease import LEASE_NAME
from vb_batch.io.sinks.metadata import META_DIR, OWN_FILES
from vb_batch.io.sinks.staging import is_part_name


def check_real_paths(fs, root: str, describe: str, table_dirs: tuple[str, ...] = ()) -> None:
    """Refuse a local output in which a path vb_batch uses is a link (see the module docstring).

    `table_dirs`: the format's own folders at the top of the output, checked for links like `_vb/`.
    """
    if not isinstance(fs, LocalFileSystem):
        return
    for path, problem in _linked_paths(root, table_dirs):
        raise ConfigError(
            f"{describe}: {posixpath.relpath(path, root)} is {problem}; vb_batch never follows links inside an "
            "output, so it refuses it rather than delete, move or write anything through it. Replace it with a "
            "real file or folder, or choose another output"
        )


def check_real_folder(fs, path: str, describe: str) -> None:
    """Refuse when `path` (a folder vb_batch is about to write into, e.g. `_vb`) is a symbolic link."""
    if isinstance(fs, LocalFileSystem) and os.path.islink(path):
        raise ConfigError(
            f"{describe}: {posixpath.basename(path)} is {_link_problem(path)}; vb_batch never follows links inside "
            "an output. Replace it with a real folder, or choose another output"
        )


def _linked_paths(root: str, table_dirs: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(path, what is wrong with it) of every path vb_batch would use under `root` that is not real."""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name == META_DIR or entry.name in table_dirs:
            yield from _linked_in_folder(entry, vb_files=entry.name == META_DIR)
        elif entry.name in OWN_FILES or is_part_name(entry.name):
            yield from _linked_file(entry, hard_links_matter=True)


def _linked_in_folder(folder: os.DirEntry, vb_files: bool) -> Iterator[tuple[str, str]]:
    """A folder's links, all the way down (`vb_files`: files vb_batch wrote itself, so hard links matter too)."""
    if folder.is_symlink():
        yield folder.path, _link_problem(folder.path)
        return
    if not folder.is_dir(follow_symlinks=False):
        return
    with os.scandir(folder.path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
                yield from _linked_in_folder(entry, vb_files)
            else:
                # A lease is linked into place (two names for a moment): not a trick, and the lease's own business.
                lease = entry.name.startswith(LEASE_NAME)
                yield from _linked_file(entry, hard_links_matter=(vb_files and not lease) or is_part_name(entry.name))


def _linked_file(entry: os.DirEntry, hard_links_matter: bool) -> Iterator[tuple[str, str]]:
    if entry.is_symlink():
        yield entry.path, _link_problem(entry.path)
    elif hard_links_matter and entry.is_file(follow_symlinks=False):
        links = entry.stat(follow_symlinks=False).st_nlink
        if links > 1:
            yield entry.path, f"a file with {links} hard links (vb_batch writes its files with one)"


def _link_problem(path: str) -> str:
    try:
        return f"a symbolic link (to {os.readlink(path)})"
    except OSError:
        return "a symbolic link"
