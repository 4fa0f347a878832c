"""Input positions: what of the input a run read to the end, kept in the output's own log, so that the
next resume (or a scheduled "label what is new" run) opens only what is new.

A run that went through its whole input (every unit read, every row committed or skipped) records
where the input stood when it started, as the last step of its run, in the output's log:

    Parquet output   a commit record with a `position` key (`_vb/commits/`)
    Delta output     an empty commit whose info carries `vb.input-position`
    Iceberg output   the table property `vb.input-position` (with the output's snapshot at that time)

and what that position says, per kind of input:

    files    a Parquet file, folder or prefix: every data file with its size, ETag (object stores) or
             modification time, and rows; a file found again with the same size and stamp is done
    delta    the table version read: the data files of that version that are still in the table are done
    iceberg  the snapshot read: the data files of that snapshot still in the table are done

A position counts only for the same input read the same way (`identity`: where, the filter, the id,
image and URI columns, the duplicate-id rule), never for `run.retry_failed` (the failed rows sit in
files a position calls done), and only while no commit after it removed rows from the output (an
overwrite, `retry_failed`'s deletes, a file lost and dropped by recovery; compaction moves rows
without removing any and is marked as such). Everything else is read as before: new files in full,
changed files by their id column first (the run core then skips the row groups whose ids are all
committed, `Source.units`). A position is an optimisation that can only make a run read less: a run
killed before recording its position leaves the previous one, and the next run reads what is not
in it again, its committed rows skipped by id.

The value is JSON, zlib-compressed and base64-encoded (`encode_position`): a Delta commit info and
an Iceberg table property are strings, and a listing of thousands of files compresses well.
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import posixpath
import zlib
from dataclasses import dataclass, field
from typing import Any

from vb_batch.config import InputConfig
from vb_batch.io.filesystems import canonical_location, fsspec_filesystem, split_scheme

log = logging.getLogger(__name__)

POSITION_KEY = "vb.input-position"  # Delta commit info key, Iceberg table property
POSITION_VERSION = 1
# A commit that moves rows without removing any (`vb-batch compact`) says so, under this key, with this value.
OPERATION_KEY = "vb.operation"
COMPACTION = "compact"


def encode_position(position: dict[str, Any]) -> str:
    return "z:" + base64.b64encode(zlib.compress(json.dumps(position, sort_keys=True).encode(), 6)).decode()


def decode_position(value: Any) -> dict[str, Any] | None:
    """A recorded position, or None for anything that is not one (never an error: the run reads everything)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.startswith("z:"):
        return None
    try:
        position = json.loads(zlib.decompress(base64.b64decode(value[2:])))
    except (ValueError, zlib.error):
        return None
    return position if isinstance(position, dict) and position.get("version") == POSITION_VERSION else None


def input_identity(cfg: InputConfig, location: str) -> dict[str, Any]:
    """What must be equal for a position to count: the same input, read the same way."""
    where = f"table:{cfg.table}@{cfg.catalog.get('uri', '')}" if cfg.table else canonical_location(
        location or cfg.path, cfg.storage)
    return {"where": where, "filter": cfg.filter, "id_column": cfg.id_column, "image_column": cfg.image_column,
            "uri_column": cfg.uri_column, "duplicate_ids": cfg.duplicate_ids}


@dataclass
class InputState:
    """Where the input stands now (`kind`: files, delta or iceberg), and what of it a position says is done."""

    kind: str
    identity: dict[str, Any]
    version: int | None = None  # delta: the table version read; iceberg: the snapshot id read
    # files: relative path -> [size, stamp, rows or None] of every data file found now
    files: dict[str, list[Any]] = field(default_factory=dict)

    def position(self, rows: dict[str, int]) -> dict[str, Any]:
        """The position to record once the run went through its input: files kind, the files in `rows`
        (the ones it read, and the ones a position let it skip; name -> rows), as found when it started."""
        position: dict[str, Any] = {"version": POSITION_VERSION, "kind": self.kind, "identity": self.identity}
        if self.kind == "files":
            position["files"] = {name: [size, stamp, rows[name]]
                                 for name, (size, stamp, _) in self.files.items() if name in rows}
        else:
            position["input_version"] = self.version
        return position


def file_listing(location: str, cfg: InputConfig) -> dict[str, list[Any]]:
    """Every Parquet data file under `location` (a file, folder or prefix): relative path -> [size, stamp, None].

    The stamp is the object store's ETag where it gives one, else the modification time: a file
    rewritten in place (same name) gets a new one. Hidden files (`.`, `_`) are not data, as for the reader.
    """
    fs, root = fsspec_filesystem(location, cfg.storage)
    found = fs.find(root, detail=True)
    listing = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        name = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        if any(part.startswith((".", "_")) for part in name.split("/")):
            continue
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        listing[name] = [int(info.get("size") or 0), str(stamp), None]
    return listing


def relative_name(url: str, location: str) -> str:
    """A data file's path relative to the input's root (its name when the input is the file itself)."""
    root = split_scheme(location)[1].rstrip("/")
    path = split_scheme(url)[1]
    return path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)


def usable(position: dict[str, Any] | None, state: InputState | None, retry_failed: bool) -> bool:
    """Whether a recorded position speaks for this run's input (see the module docstring)."""
    if position is None or state is None or retry_failed:
        return False
    return position.get("kind") == state.kind and position.get("identity") == state.identity


def done_files(position: dict[str, Any], state: InputState) -> dict[str, int | None]:
    """Files kind: relative path -> rows of every file found now as the position recorded it."""
    recorded = position.get("files") or {}
    done = {}
    for name, (size, stamp, _) in state.files.items():
        entry = recorded.get(name)
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == size and entry[1] == stamp:
            done[name] = entry[2] if isinstance(entry[2], int) else None
    return done


def may_hold(values: Any, low: Any, high: Any) -> bool:
    """Whether a file whose column lies within [low, high] (its statistics; None: unknown) may hold one of
    `values` (a sorted list, or an Arrow array)."""
    if low is None or high is None:
        return True
    if not isinstance(values, list):
        values = sorted(values.to_pylist())
    try:
        at = bisect.bisect_left(values, low)
        return at < len(values) and values[at] <= high
    except TypeError:  # statistics of another type than the ids
        return True
