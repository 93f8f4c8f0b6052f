"""Cache layout: one folder per store, a zarr v3 store inside, and a record of which shards are done.

    <cache_dir>/wildenberg2023/<experiment>-<hash>/
        source.json                  everything the store's name derives from (readable)
        data.zarr/                   zarr v3 + OME-Zarr 0.5, (z, y, x): the image `raw`, and each label
                                     as an image-label group labels/<label> holding its array `0`
        progress/<array>/<i>.<j>.<k> one record per shard written: its file's size and index crc32c,
                                     its voxels' digest (level 0), its foreground index (labels)
        progress/<array>/COMPLETE    written only after every shard of the array is recorded

A shard is recorded only after its bytes are on disk, and an array is complete only when every
shard is recorded, so a process killed at any moment leaves nothing that is taken as complete:
the next run rewrites the unrecorded shards whole. zarr metadata is created in a temporary folder
and renamed into place, so a kill never leaves a half-written zarr.json either.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from .format import LABEL_CODEC, shard_file_problem
from .layout import array_metadata, array_path, group_metadata, shard_grid
from .files import durable_write, make_dirs, remove_leftovers
from .ledger import Ledger, ledger_for, shard_key
from .liveness import close_lock_fd, file_lock, open_lock_fd, owning, try_lock

# What the root's `wildenberg_intake.complete_arrays` tells readers other than this package.
COMPLETE_MEANING = ("arrays (paths in this zarr store) holding every shard; any other array may hold shards not "
                    "fetched yet, which zarr-python, napari and neuroglancer read as the fill value 0. Read a "
                    "partial store through wildenberg-intake (to_dask, lazy=True), `wildenberg-intake serve`, "
                    "or after `wildenberg-intake fetch`.")
_RECORD = re.compile(r"\d+\.\d+\.\d+")  # a shard record's file name: i.j.k
MISSING_FILE = "its file is missing"


def has_file(record: dict) -> bool:
    """Whether a shard record says the shard has a file (an all-zero shard has none, as in zarr)."""
    return record.get("index_crc32c") is not None


def combine_digests(hexdigests) -> str:
    """One checksum of an array from its shards' digests in grid order: the sha256 of their lines."""
    return hashlib.sha256("\n".join(hexdigests).encode()).hexdigest()


class DamagedShard(RuntimeError):
    """A shard file of a store that does not hold what was written: named with the remedy."""

    def __init__(self, shard_path, problem: str):
        path = Path(shard_path)
        parts = path.parts
        at = parts.index("data.zarr") if "data.zarr" in parts else len(parts) - 1
        store = Path(*parts[:at])
        array = "/".join(parts[at + 1:parts.index("c", at)]) if "c" in parts[at:] else "?"
        shard = tuple(int(p) for p in parts[parts.index("c", at) + 1:]) if "c" in parts[at:] else ()
        self.store, self.array, self.shard = store, array, shard
        super().__init__(f"store {store}: array {array}, shard {shard} is damaged ({problem}). Run "
                         f"`wildenberg-intake verify {store}` to list every damaged shard and the source's "
                         f"repair() to fetch them again, or delete {store} to rebuild it.")


class StoreCache:
    """The folder of one cached store: paths, array creation and shard bookkeeping."""

    def __init__(self, cache_dir, name: str):
        self.root = Path(cache_dir) / "wildenberg2023" / name
        self.zarr_path = self.root / "data.zarr"
        self.progress = self.root / "progress"

    # -- creation -------------------------------------------------------------------------------
    def initialise(self, key: dict, attributes: dict):
        """Create the folder, source.json and the zarr root group (idempotent, atomic)."""
        try:
            make_dirs(self.root)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the cache folder {self.root}: {e.strerror}") from e
        if not (self.root / "source.json").exists():
            durable_write(self.root / "source.json", json.dumps(key, indent=2, sort_keys=True).encode())
        self._ensure_group("", attributes)
        self._ensure_group("labels", {})

    def _ensure_group(self, path: str, attributes: dict):
        target = self.zarr_path / path
        if not (target / "zarr.json").exists():
            make_dirs(target)
            durable_write(target / "zarr.json", json.dumps(group_metadata(attributes), indent=2).encode())

    def ensure_array(self, name: str, shape, dtype: str, is_label: bool, attributes: dict, codec: str = LABEL_CODEC,
                     ome: dict | None = None):
        """Create array `name`'s metadata atomically if missing; refuse a mismatching one.

        ome: for a label, its OME-Zarr multiscales entry (its group is made an image-label group)."""
        target = self.zarr_path / array_path(name)
        if name.startswith("labels/") and ome is not None:
            self._ensure_group(name, {"ome": {"version": "0.5", "multiscales": [ome],
                                              "image-label": {"source": {"image": "../../"}}}})
            self._update_label_list()
        meta = array_metadata(shape, dtype, is_label, codec, attributes)
        if not (target / "zarr.json").exists():  # a racing process writes the same bytes
            make_dirs(target)
            durable_write(target / "zarr.json", json.dumps(meta, indent=2).encode())
        found = json.loads((target / "zarr.json").read_text())
        if (found.get("shape"), found.get("data_type")) != (meta["shape"], meta["data_type"]):
            raise RuntimeError(f"cached array {target} has shape {found.get('shape')} and dtype "
                               f"{found.get('data_type')}; expected {tuple(shape)} and {dtype}. "
                               f"Delete {self.root} to rebuild it.")

    def _update_label_list(self):
        """labels/zarr.json lists every label group present (OME-Zarr `labels`), rewritten atomically
        under a lock: two processes adding different labels at once both end up listed."""
        folder = self.zarr_path / "labels"
        with file_lock(self.root / "locks" / "labels.lock"):
            present = sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())
            meta = json.loads((folder / "zarr.json").read_text())
            if meta.get("attributes", {}).get("ome", {}).get("labels") != present:
                meta.setdefault("attributes", {})["ome"] = {"version": "0.5", "labels": present}
                durable_write(folder / "zarr.json", json.dumps(meta, indent=2).encode())

    def label_view(self, label: str) -> Path:
        """A zarr group `views/<label>.zarr` whose `raw` and `labels` link to this store's arrays.

        Tools written for one label per store (torch-em's `raw_key="raw"`, `label_key="labels"`)
        open it directly; nothing is copied.
        """
        import zarr
        view = self.root / "views" / f"{label}.zarr"
        if (view / "labels").exists():
            return view
        if not (self.zarr_path / array_path(f"labels/{label}") / "zarr.json").exists():
            raise FileNotFoundError(f"{self.zarr_path / 'labels' / label} does not exist yet; materialise it first")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes={"label": label})
            os.symlink(Path("..") / ".." / "data.zarr" / "raw", tmp / "raw")
            os.symlink(Path("..") / ".." / "data.zarr" / array_path(f"labels/{label}"), tmp / "labels")
            view.parent.mkdir(exist_ok=True)
            try:
                os.rename(tmp, view)
            except OSError:  # made meanwhile by another process
                if not (view / "labels").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return view

    # -- bookkeeping ----------------------------------------------------------------------------
    def shard_file(self, name: str, index) -> Path:
        return self.zarr_path / array_path(name) / "c" / Path(*(str(i) for i in index))

    def write_shard(self, name: str, index, parts: list | None):
        """Put an encoded shard (the pieces `assemble_shard` returns) in place whole (renamed from a
        temporary file); None removes it (an all-zero shard has no file, as zarr writes none)."""
        path = self.shard_file(name, index)
        if parts is None:
            path.unlink(missing_ok=True)
            return
        make_dirs(path.parent)
        # A killed writer of this shard (its write cut between fsync and rename) left its temporary
        # file; lazy stores never complete, so it goes now (a live writer's is locked and kept).
        remove_leftovers(path.parent.glob(f".{path.name}.*.tmp"))
        durable_write(path, *parts)

    def record_path(self, name: str, index) -> Path:
        """The done record of shard `index` of array `name` (its mtime: when it was last used)."""
        return self.progress / name / ".".join(str(i) for i in index)

    def own_shard(self, name: str, index, cancelled=lambda: False):
        """Own shard `index` of array `name` while writing it (a context manager yielding whether it
        still needs writing): its ownership lock, waited for while a live task or process holds it,
        taken over from a dead one. `cancelled()`: stop waiting (raises `Cancelled`)."""
        lock = self.progress / name / (".".join(map(str, index)) + ".lock")
        return owning(lock, lambda: self.is_done(name, index), cancelled, f"shard {tuple(index)} of {name}")

    def array_lock(self, name: str):
        """The lock that marking array `name` complete and evicting one of its shards both take, so
        that COMPLETE is never written while a shard it counted is being evicted."""
        return file_lock(self.root / "locks" / (name.replace("/", "~") + ".lock"))

    @classmethod
    def at(cls, path) -> "StoreCache":
        """The store whose folder is `path` or holds it (its data.zarr, an array, a file inside)."""
        path = Path(path).resolve()  # `.`, `data.zarr`, `../p105-...`: the store's name is its folder's
        for root in (path, *path.parents):
            if (root / "data.zarr" / "zarr.json").is_file() and root.parent.name == "wildenberg2023":
                return cls(root.parent.parent, root.name)
        raise ValueError(f"path={str(path)!r} is not in a wildenberg-intake store; allowed: a folder "
                         "<cache_dir>/wildenberg2023/<store>, its data.zarr or anything inside them")

    def arrays(self) -> list[str]:
        """Names of the arrays the store holds: raw, labels/<label>, and their pyramid levels (`@<k>`)."""
        def levels(name):
            found, k = [], 1
            while (self.zarr_path / array_path(f"{name}@{k}") / "zarr.json").is_file():
                found.append(f"{name}@{k}")
                k += 1
            return found
        out = [n for n in ("raw",) if (self.zarr_path / n / "zarr.json").is_file()]
        out += levels("raw") if out else []
        labels = self.zarr_path / "labels"
        if labels.is_dir():
            for p in sorted(labels.iterdir()):
                if (self.zarr_path / array_path(f"labels/{p.name}") / "zarr.json").is_file():
                    out += [f"labels/{p.name}"] + levels(f"labels/{p.name}")
        return out

    def mark_done(self, name: str, index, content: str | None = None, missing_chunks=(),
                  foreground: dict | None = None) -> dict:
        """Record shard `index` of `name` as written, after `write_shard`: its file's size and index
        crc32c (none: an all-zero shard, no file), the CONTENT_DIGEST of its voxels where one is
        read (level 0: locks, synapse tables; None for pyramid levels), the source chunks the server
        answered 404 for (read as zeros), and for a label its foreground index (foreground.py)."""
        record = {"bytes": 0, "index_crc32c": None, "content_xxh3": content, "missing_chunks": sorted(missing_chunks)}
        if foreground is not None:
            record["foreground"] = foreground
        try:
            with open(self.shard_file(name, index), "rb") as f:
                record["bytes"] = os.fstat(f.fileno()).st_size
                f.seek(-4, os.SEEK_END)
                record["index_crc32c"] = f.read(4).hex()  # the last 4 bytes: the crc32c of the shard's index
        except FileNotFoundError:
            pass  # all zeros: no file
        target = self.record_path(name, index)
        make_dirs(target.parent)
        durable_write(target, json.dumps(record).encode())
        self.ledger.add("shard", shard_key(name, index), record["bytes"])
        return record

    @property
    def ledger(self) -> Ledger:
        """The store's size ledger (this process's view; see `ledger.py`)."""
        return ledger_for(self.root)

    def done_shards(self, name: str) -> set:
        folder = self.progress / name
        if not folder.is_dir():
            return set()
        return {tuple(int(i) for i in p.name.split(".")) for p in folder.iterdir()
                if _RECORD.fullmatch(p.name)}

    def shard_bytes(self, name: str, index) -> int:
        """Bytes of shard `index`'s file on disk (0: no file, e.g. an all-zero shard)."""
        try:
            return self.shard_file(name, index).stat().st_size
        except FileNotFoundError:
            return 0

    def disk_usage(self, name: str) -> tuple[int, int]:
        """(shards recorded, bytes of their files on disk) of array `name`."""
        done = self.done_shards(name)
        return len(done), sum(self.shard_bytes(name, i) for i in done)

    def hold(self, name: str, index, touch: bool = False) -> int | None:
        """Keep recorded shard `index` from being evicted while it is read: a shared lock (flock) on
        its record, released by `close_lock_fd` on the returned descriptor. None if it is not recorded (never
        written, or evicted meanwhile). touch: mark it used now (its record's mtime), the order in
        which eviction picks shards; nothing is written otherwise, so a complete store may be read-only."""
        try:
            fd = open_lock_fd(self.record_path(name, index), os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink == 0:  # evicted while we waited for the lock
            close_lock_fd(fd)
            return None
        if touch:
            try:
                os.utime(fd)
            except OSError:
                pass  # a read-only cache: nothing is evicted there either
        return fd

    def evict(self, name: str, index) -> bool:
        """Forget and delete recorded shard `index` unless a process holds it (see `hold`); returns
        whether it did. The array's COMPLETE mark and the shard's record go before its file, so an
        evicted shard is never taken as done; a later read fetches it again."""
        try:
            fd = open_lock_fd(self.record_path(name, index), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being read
            if os.fstat(fd).st_nlink == 0:
                return False  # evicted by another process meanwhile
            with self.array_lock(name):
                self._forget_complete(name)
                self.record_path(name, index).unlink(missing_ok=True)
            self.shard_file(name, index).unlink(missing_ok=True)
            self.ledger.remove("shard", shard_key(name, index))
            return True
        finally:
            close_lock_fd(fd)

    def is_done(self, name: str, index) -> bool:
        return self.record_path(name, index).is_file()

    def is_complete(self, name: str) -> bool:
        return (self.progress / name / "COMPLETE").is_file()

    def record(self, name: str, index) -> dict | None:
        try:
            return json.loads(self.record_path(name, index).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def mark_complete(self, name: str, shape) -> list:
        """Mark array `name` complete once every shard is recorded; note the 404 chunks in its
        attributes and return them."""
        self._require_every_shard(name, shape)
        empty = sorted({c for i in shard_grid(shape) for c in (self.record(name, i) or {}).get("missing_chunks", [])})
        # Temporary files of writes cut short by a kill: every shard is recorded now, and a lazy
        # reader may be writing a record's last use right now (its file is locked).
        folder = self.zarr_path / array_path(name)
        remove_leftovers([*folder.rglob(".*.tmp"), *(self.progress / name).glob(".*.tmp")])
        for lock in (self.progress / name).glob("*.lock"):  # shard locks killed writers left: free now
            if (held := try_lock(lock)) is not None:
                held.release()
        for partial in folder.rglob("*.partial"):  # zarr's own, unlocked: old ones are nobody's
            try:
                if partial.stat().st_mtime < time.time() - 300:
                    partial.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        with self.array_lock(name):  # no shard is evicted between this last scan and COMPLETE
            self._require_every_shard(name, shape)
            # The metadata before COMPLETE: a kill between them leaves an array whose every shard is
            # recorded (so the note is true) and that the next run marks complete again.
            self._note_complete(name, True, {"missing_source_chunks": {
                "count": len(empty), "chunks": empty,
                "meaning": "source chunks the server answered 404 for; stored as zeros (empty, not unfetched)"}})
            durable_write(self.progress / name / "COMPLETE", b"")
        return empty

    def _forget_complete(self, name: str):
        """Unmark array `name` complete (under its array lock): its metadata first, then COMPLETE, so
        that what other readers see never claims more than the records hold."""
        try:
            meta = json.loads((self.zarr_path / array_path(name) / "zarr.json").read_text())
        except FileNotFoundError:
            meta = {}
        if meta.get("attributes", {}).get("wildenberg_intake_complete"):
            self._note_complete(name, False)
        (self.progress / name / "COMPLETE").unlink(missing_ok=True)

    def _note_complete(self, name: str, complete: bool, attributes: dict | None = None):
        """Say in the zarr metadata, for readers other than this package, whether array `name` is
        complete: its own attribute `wildenberg_intake_complete`, and the root's list
        `wildenberg_intake.complete_arrays` (array paths). An array not complete may hold shards not
        fetched yet, which zarr-python, napari and neuroglancer read as zeros."""
        meta_path = self.zarr_path / array_path(name) / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta.setdefault("attributes", {}).update({**(attributes or {}), "wildenberg_intake_complete": complete})
        durable_write(meta_path, json.dumps(meta, indent=2).encode())
        with file_lock(self.root / "locks" / "attributes.lock"):  # arrays of one store change it at once
            root_path = self.zarr_path / "zarr.json"
            root = json.loads(root_path.read_text())
            note = root.setdefault("attributes", {}).setdefault("wildenberg_intake", {})
            listed = set(note.get("complete_arrays", [])) - {array_path(name)} | ({array_path(name)} if complete else set())
            note.update({"complete_arrays": sorted(listed), "meaning": COMPLETE_MEANING})
            durable_write(root_path, json.dumps(root, indent=2).encode())

    def _require_every_shard(self, name: str, shape):
        missing = set(shard_grid(shape)) - self.done_shards(name)
        if missing:
            raise RuntimeError(f"{self.zarr_path / name}: {len(missing)} shards are not recorded as written "
                               f"(first: {min(missing)}); run the materialisation again to write them")

    def content_checksum(self, name: str, shape) -> str:
        """Checksum of an array's voxels, independent of compression: sha256 over its shards'
        CONTENT_DIGEST hex digests in grid order (recorded as they were written; level 0 only)."""
        hashes = []
        for index in shard_grid(shape):
            rec = self.record(name, index)
            if rec is None or not rec.get("content_xxh3"):
                raise RuntimeError(f"{self.zarr_path / name}: shard {index} has no content record; is it complete?")
            hashes.append(rec["content_xxh3"])
        return combine_digests(hashes)

    # -- integrity --------------------------------------------------------------------------------
    def verify(self) -> dict:
        """Reread every shard and compare it with its record.

        Returns {array: {"complete": bool, "missing": [shard], "corrupt": [shard], "unfetched": [shard],
        "checked": recorded shards compared}}:
        missing = recorded but its file is gone; corrupt = its bytes differ from the record;
        unfetched = not recorded yet (a run that has not finished).
        """
        import zarr
        report = {}
        for name in self.arrays():
            shape = zarr.open_array(str(self.zarr_path), path=array_path(name), mode="r", zarr_format=3).shape
            entry = {"complete": self.is_complete(name), "missing": [], "corrupt": [], "unfetched": [], "checked": 0}
            for index in shard_grid(shape):
                rec = self.record(name, index)
                if rec is None:
                    entry["unfetched"].append(index)
                    continue
                entry["checked"] += 1
                problem = self.check_shard(name, index, hashes=True)
                if problem is not None:
                    entry["missing" if problem == MISSING_FILE else "corrupt"].append(index)
            report[name] = entry
        return report

    def check_shard(self, name: str, index, hashes: bool = False) -> str | None:
        """What is wrong with recorded shard `index` (None: nothing): its file's size against its
        record (one stat), and with `hashes` every byte of it (reads the file: its index crc32c
        against the record's, its index's and each chunk's crc32c, see `shard_file_problem`)."""
        rec = self.record(name, index)
        if rec is None:
            return None
        path = self.shard_file(name, index)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None if not has_file(rec) else MISSING_FILE
        if not has_file(rec):
            return "a file exists where an all-zero shard was recorded"
        if size != rec["bytes"]:
            return f"{size} bytes on disk, {rec['bytes']} recorded"
        if hashes:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return MISSING_FILE
            if data[-4:].hex() != rec["index_crc32c"]:
                return "its index differs from the one recorded (another shard's file?)"
            return shard_file_problem(data)
        return None

    def check_shards(self, name: str, hashes: bool = False):
        """Raise `DamagedShard` for the first recorded shard of `name` whose file differs from its
        record (sizes: one stat per shard; with `hashes`, every byte too), naming how many are damaged."""
        bad = [(index, problem) for index in sorted(self.done_shards(name))
               if (problem := self.check_shard(name, index, hashes))]
        if bad:
            index, problem = bad[0]
            more = f"; {len(bad) - 1} more shards of {name} are damaged too" if len(bad) > 1 else ""
            raise DamagedShard(self.shard_file(name, index), problem + more)

    def invalidate(self, name: str, shards):
        """Forget shards (their records, files and the array's COMPLETE mark) so the next run rewrites
        them. COMPLETE and the records go under the array lock, as in `evict`: a `mark_complete`
        running meanwhile never writes COMPLETE over a shard forgotten here."""
        shards = list(shards)
        with self.array_lock(name):
            self._forget_complete(name)
            for index in shards:
                self.record_path(name, index).unlink(missing_ok=True)
        for index in shards:
            self.shard_file(name, index).unlink(missing_ok=True)
            self.ledger.remove("shard", shard_key(name, index))
