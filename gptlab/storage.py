"""Everything that writes a directory the user keeps: atomic writes, manifests, keep-N rotation,
and the rule about where a script may write.

A directory (a checkpoint, a snapshot, a data set) is built under a temporary sibling name, given a
manifest of sha256 checksums, flushed and renamed into place, so a crash leaves either the old
state or the new one. Dropping one renames it first, so a crash while deleting never leaves
something that looks whole. A script writes only into a directory that is absent, empty or
already of its own kind, and never into one it reads from.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from gptlab.errors import UserError

MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize_directory(tmp_dir: Path, target: Path) -> None:
    """Add a manifest to a complete tmp_dir, flush everything to disk, and rename it to target."""
    files = sorted(p for p in tmp_dir.iterdir() if p.is_file())
    manifest = {"files": {p.name: sha256_of(p) for p in files}}
    (tmp_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for path in [*files, tmp_dir / MANIFEST_FILE, tmp_dir]:
        fsync(path)
    if target.exists():
        drop_directory(target)
    os.replace(tmp_dir, target)
    fsync(target.parent)


def write_directory_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create target by fill(tmp_dir) in a temporary sibling, add a manifest, flush, and rename."""
    target = Path(target)
    created = [p for p in target.absolute().parents if not p.exists()]  # deepest first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
        try:
            tmp_dir.chmod(0o755)  # mkdtemp makes it private; what we write is meant to be shared
            fill(tmp_dir)
            finalize_directory(tmp_dir, target)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except BaseException:
        for parent in created:  # a failed write leaves no new empty directories behind
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return target


def verify_manifest(directory: Path) -> None:
    """Refuse a directory whose files do not match the checksums in its manifest."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{directory} has no {MANIFEST_FILE}: it is incomplete")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{manifest_path} is corrupt; the directory cannot be trusted") from None
    for name, digest in files.items():
        if not (directory / name).is_file() or sha256_of(directory / name) != digest:
            raise UserError(f"{directory / name} is missing or corrupt (checksum mismatch)")


def drop_directory(directory: Path) -> None:
    """Delete a directory, renamed first so that a crash half-way leaves nothing that looks whole."""
    doomed = directory.with_name(f"{TMP_PREFIX}drop-{directory.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(directory, doomed)
    shutil.rmtree(doomed)


def keep_first(directories: Iterable[Path], keep: int) -> None:
    """Drop every directory after the first `keep` (the caller orders them, most wanted first)."""
    for directory in list(directories)[keep:]:
        drop_directory(directory)


def remove_leftovers(parent: Path) -> None:
    """Remove the temporary directories a crash during a write left in parent."""
    for tmp in parent.glob(f"{TMP_PREFIX}*") if parent.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def check_output_dir(
    out_dir: Path,
    kind: str,
    is_own_kind: Callable[[Path], bool],
    reads_from: Iterable[Path] = (),
) -> None:
    """Refuse to write into out_dir unless it is absent, empty or already a `kind` (is_own_kind),
    or if it holds or is held by anything the script reads (writing there could destroy it)."""
    out_dir = Path(out_dir)
    for source in reads_from:
        source = Path(source)
        if source.exists() and (_inside(source, out_dir) or _inside(out_dir, source)):
            raise UserError(
                f"output directory {out_dir} overlaps {source}, which this run reads from; "
                "choose another output directory"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a directory; choose another output directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_own_kind(out_dir):
        raise UserError(
            f"{out_dir} is not empty and does not hold a {kind}; choose an empty or new directory "
            "(nothing was changed)"
        )
