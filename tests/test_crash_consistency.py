"""Power loss, in the spirit of ALICE (Pillai et al., OSDI 2014).

A fetch's file operations are recorded (renames with the bytes they put in place and whether
those bytes were fsynced first, unlinks, fsyncs of folders). From the recording, the states a
power loss could leave are built: every prefix of the operations, with the renames and unlinks
not yet made durable by an fsync of their folder lost (POSIX may drop them), and with any file
renamed into place before its data was fsynced left empty. Each state must never be taken as
complete with missing or wrong data, and a fetch resumed from it must end with the bytes of an
uninterrupted run.
"""

import os
import threading
from pathlib import Path

import numpy as np

import intake
import wildenberg_intake
from wildenberg_intake.store.layout import shard_grid
from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.files import file_sha256
from wildenberg_intake.mirror import MirrorServer


class Recorder:
    """Wraps os.fsync, os.replace and os.unlink while active; records what happens under `root`."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.ops = []
        self.synced = set()
        self.lock = threading.Lock()

    def _path(self, path, dir_fd=None) -> str:
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.abspath(path)

    def __enter__(self):
        self.real = os.fsync, os.replace, os.unlink
        real_fsync, real_replace, real_unlink = self.real

        def fsync(fd):
            real_fsync(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.startswith(self.root):
                with self.lock:
                    if os.path.isdir(path):
                        self.ops.append(("dirsync", path))
                    else:
                        self.synced.add(path)

        def replace(src, dst, **kw):
            src, dst = self._path(src), self._path(dst)
            if dst.startswith(self.root):
                with self.lock:
                    data = Path(src).read_bytes()
                    self.ops.append(("rename", dst, data, src in self.synced))
                    self.synced.discard(src)
                    real_replace(src, dst, **kw)
                return
            real_replace(src, dst, **kw)

        def unlink(path, *, dir_fd=None):
            full = self._path(path, dir_fd)
            if full.startswith(self.root) and not full.endswith((".lock", ".tmp")):
                with self.lock:
                    real_unlink(path, dir_fd=dir_fd)
                    self.ops.append(("unlink", full))
                return
            real_unlink(path, dir_fd=dir_fd)
        os.fsync, os.replace, os.unlink = fsync, replace, unlink
        return self

    def __exit__(self, *exc):
        os.fsync, os.replace, os.unlink = self.real

    def states(self, k: int) -> dict:
        """The power-loss states after the first k operations: name -> {path: bytes or None}."""
        ops = self.ops[:k]
        durable_dirs_after = {}  # op index -> set of folders fsynced after it
        later = set()
        for i in range(len(ops) - 1, -1, -1):
            durable_dirs_after[i] = set(later)
            if ops[i][0] == "dirsync":
                later.add(ops[i][1])
        out = {}
        for variant in ("everything reached the disk", "unsynced renames and unlinks lost",
                        "unsynced data lost"):
            files = {}
            for i, op in enumerate(ops):
                if op[0] == "dirsync":
                    continue
                durable = os.path.dirname(op[1]) in durable_dirs_after[i]
                if variant == "unsynced renames and unlinks lost" and not durable:
                    continue
                if op[0] == "rename":
                    data = op[2] if op[3] or variant != "unsynced data lost" else b""
                    files[op[1]] = data
                else:
                    files[op[1]] = None
            out[variant] = files
        return out


def _store_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and (p.parts[len(root.parts)] in ("data.zarr", "progress"))
            and not p.name.endswith((".lock", ".tmp"))}


def _source(base, cache_dir):
    return intake.open_catalog(wildenberg_intake.catalog_path()).p14_psd(
        base_url=base, cache_dir=str(cache_dir), progress=False, workers=1)


def _inner_chunk(shard_file: Path, coords) -> bytes | None:
    """The stored bytes of inner chunk `coords` of a shard file (None: not stored)."""
    from wildenberg_intake.store.format import CHUNKS, SHARDS
    per = tuple(s // c for s, c in zip(SHARDS, CHUNKS))
    data = shard_file.read_bytes() if shard_file.exists() else b""
    if not data:
        return None
    index = np.frombuffer(data[-(16 * int(np.prod(per)) + 4):-4], dtype="<u8").reshape(per + (2,))
    offset, length = (int(v) for v in index[coords])
    return None if offset == 2**64 - 1 else data[offset:offset + length]


def _never_taken_as_complete_with_damage(cache: StoreCache, clean: StoreCache):
    import json
    from wildenberg_intake.store.layout import array_path
    from wildenberg_intake.store.staging import QuarterStage
    for name in clean.arrays():
        meta = cache.zarr_path / array_path(name) / "zarr.json"
        if not meta.exists():
            assert not cache.done_shards(name) and not cache.is_complete(name)
            continue
        shape = json.loads(meta.read_text())["shape"]
        records = cache.done_shards(name)
        if cache.is_complete(name):
            assert records == set(shard_grid(shape)), f"{name} marked COMPLETE with shards unrecorded"
        for index in records:
            assert cache.check_shard(name, index, hashes=True) is None, \
                f"{name} shard {index} recorded done with other bytes on disk"
        # A staged quarter that reads back whole holds exactly the chunks of the level shard it is for.
        if "@" in name:
            stage = QuarterStage(cache.root, name)
            for path in sorted(stage.folder.glob("*")) if stage.folder.exists() else []:
                parent = tuple(int(i) for i in path.name.split("."))
                quarter = stage.get(parent)
                if quarter is None:
                    continue
                target = clean.shard_file(name, (parent[0], parent[1] // 2, parent[2] // 2))
                for coords, blob in quarter.items():
                    assert blob == _inner_chunk(target, coords), f"quarter {path} differs from {name}"


def test_every_power_loss_state_resumes_to_the_bytes_of_an_uninterrupted_run(wide, tmp_path):
    with MirrorServer(wide.root) as server:
        clean = _source(server.base_url, tmp_path / "clean")
        clean.materialise()
        clean_root = StoreCache(tmp_path / "clean", clean.plan.name).root
        recorded = tmp_path / "recorded"
        with Recorder(recorded) as rec:
            _source(server.base_url, recorded).materialise()
        renames = [op for op in rec.ops if op[0] == "rename"]
        assert len(renames) > 20 and all(op[3] for op in renames), "every file is fsynced before its rename"
        quarters = [op for op in renames if "/staging/quarters/" in op[1]]
        assert quarters, "the pyramid's staged quarters are among the recorded operations"
        assert any(op[0] == "dirsync" for op in rec.ops)
        clean_cache = StoreCache(tmp_path / "clean", clean.plan.name)
        # Every point, plus the operations right after each quarter is staged.
        after_quarters = [rec.ops.index(op) + 1 for op in quarters[:4]]
        points = sorted(set(np.linspace(1, len(rec.ops), 14).astype(int)) | set(after_quarters))
        checked = 0
        for k in points:
            for v, (variant, files) in enumerate(rec.states(k).items()):
                state = tmp_path / f"state-{k}-{v}"
                for path, data in files.items():
                    target = state / Path(path).relative_to(recorded)
                    if data is None:
                        target.unlink(missing_ok=True)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(data)
                src = _source(server.base_url, state)
                cache = StoreCache(state, src.plan.name)
                if cache.root.exists():
                    _never_taken_as_complete_with_damage(cache, clean_cache)
                src.materialise()
                assert _store_bytes(cache.root) == _store_bytes(clean_root), (k, variant)
                checked += 1
    assert checked >= 30
