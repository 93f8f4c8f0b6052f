"""Staged work on disk: what one shard task makes that other tasks need, kept until they are done.

- `ChunkStage`: source chunks that several output shards need (the output shards rarely line up
  with the source chunks), fetched once by whichever task asks first.
- `QuarterStage`: the pyramid made on transfer. A task holding a shard's voxels in memory
  downsamples them (x and y halved) and stages the result, encoded as the next level's inner
  chunks: one quarter of a shard of the level above (shards nest: 2 x 2 of them under one shard
  of the next level). A level shard is assembled from its staged quarters, their chunks copied as
  they are, so no level is made by reading and decoding the level below from its shards.

Both write each file whole and durably (renamed into place), so a kill or a power loss leaves a
staged file complete or absent, and both validate what they read back (a staged file that does
not decode is deleted and made again).
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from .format import check_crc32c
from .files import durable_write, make_dirs
from .ledger import Ledger, ledger_for
from .liveness import try_lock
from ..source.layers import Layer, LayerError
from ..source.transfer import NO_GATE, Cancelled, TooLarge, inflate


class ChunkStage:
    """Source chunks that several shards need: fetched once, kept on disk until all are written.

    A chunk is kept as it came over the wire: its gzip stream where the server compressed it (a
    uint32 label chunk is 16 MB inflated and a few hundred kB compressed; writing it inflated cost
    more CPU than the whole HTTP layer), its bytes otherwise, a marker for a chunk the server
    does not have."""

    MISSING = b"\x00wildenberg-intake:404\x00"  # a chunk the server does not have (read as zeros)

    def __init__(self, folder: Path, layer: Layer, ledger: Ledger):
        self.folder = folder
        self.layer = layer
        self.ledger = ledger  # the store's: staged chunks count against its budget

    def _key(self, path: Path) -> str:
        return str(path.relative_to(self.ledger.root))

    def _path(self, grid, gzipped: bool = False) -> Path:
        return self.folder / (".".join(str(g) for g in grid) + (".gz" if gzipped else ""))

    def _read(self, grid, gate):
        """(True, decoded chunk or None for a missing one) if staged, else (False, None). `gate` is
        held on return when an array is returned. A staged file that no longer decodes (damaged
        on disk) is deleted, so that the chunk is fetched again."""
        for gzipped in (False, True):
            path = self._path(grid, gzipped)
            if not path.exists():
                continue
            gate.acquire()
            try:
                data = path.read_bytes()
                data = inflate(data, self.layer.info.chunk_bytes(grid)) if gzipped \
                    else None if data == self.MISSING else data
                decoded = None if data is None else self.layer.decode_chunk(grid, data)
            except FileNotFoundError:  # released meanwhile: fetched again below
                gate.release()
                continue
            except (LayerError, TooLarge, zlib.error, ValueError):
                gate.release()
                path.unlink(missing_ok=True)
                self.ledger.remove("staged", self._key(path))
                return False, None
            except BaseException:
                gate.release()
                raise
            if decoded is None:
                gate.release()
            return True, decoded
        return False, None

    def get(self, grid, gate=NO_GATE, token=None):
        """The decoded chunk ((z, y, x) array; None: the server lacks it), fetched by whichever task
        asks first. Nothing is staged before it decodes to the chunk's shape and dtype.

        gate: see `Fetcher.get_with_wire`: held on return when an array is returned."""
        plain = self._path(grid)
        lock = plain.with_name(plain.name + ".lock")
        while True:
            staged, decoded = self._read(grid, gate)
            if staged:
                return decoded
            make_dirs(self.folder)
            if (held := try_lock(lock)) is not None:
                try:
                    staged, decoded = self._read(grid, gate)
                    if staged:
                        return decoded
                    data, wire = self.layer.fetch_chunk_with_wire(grid, gate, token)
                    try:
                        decoded = None if data is None else self.layer.decode_chunk(grid, data)
                        if wire is not None and len(wire) * 4 > len(data):
                            wire = None  # compressed less than 4x: re-inflating costs more than writing it whole
                        path = self._path(grid, gzipped=wire is not None)
                        body = self.MISSING if data is None else data if wire is None else wire
                        durable_write(path, body)
                        self.ledger.add("staged", self._key(path), len(body))
                    except BaseException:
                        if data is not None:
                            gate.release()
                        raise
                    return decoded
                finally:
                    held.release()
            if (token is not None and token.is_set()) or self.layer.fetcher.cancelled.is_set():
                raise Cancelled(f"stopped waiting for chunk {self.layer.chunk_name(grid)} of {self.layer.url}: "
                                "the run is stopping")
            time.sleep(0.01)  # another task is fetching it

    def release(self, grid):
        for gzipped in (False, True):
            path = self._path(grid, gzipped)
            path.unlink(missing_ok=True)
            self.ledger.remove("staged", self._key(path))


class QuarterStage:
    """Staged quarters of the shards of pyramid level `name` (`<array>@<level>`).

    The quarter that shard `parent` of the level below contributes to shard
    (parent[0], parent[1] // 2, parent[2] // 2) of this level covers 2 x 2 x 2 of its inner chunks
    (128 x 256 x 256 voxels), at inner-chunk offset (0, 2 * (parent[1] % 2), 2 * (parent[2] % 2)).
    It is stored as those chunks encoded as the level stores them (Blosc + crc32c), so a level
    shard is assembled by copying bytes. File: b"WIQ1", the header's length (uint32), a JSON header
    [[chunk coordinates in the shard, length], ...], then the chunks one after the other."""

    MAGIC = b"WIQ1"

    def __init__(self, root: Path, name: str):
        self.name = name
        self.folder = Path(root) / "staging" / "quarters" / name
        self.ledger = ledger_for(root)  # staged quarters count against the store's budget

    def path(self, parent) -> Path:
        return self.folder / ".".join(str(i) for i in parent)

    def put(self, parent, encoded: dict):
        """Stage `parent`'s quarter: its encoded chunks by coordinates in the level shard (all-zero
        chunks left out, as in a shard)."""
        items = sorted(encoded.items())
        header = json.dumps([[list(c), len(b)] for c, b in items]).encode()
        make_dirs(self.folder)
        parts = [self.MAGIC, struct.pack("<I", len(header)), header, *(b for _, b in items)]
        durable_write(self.path(parent), *parts)
        self.ledger.add("staged", self._key(parent), sum(len(p) for p in parts))

    def _key(self, parent) -> str:
        return str(self.path(parent).relative_to(self.ledger.root))

    def get(self, parent) -> dict | None:
        """The staged quarter of `parent` ({coords: encoded chunk}), or None if it is not staged. A
        staged file that does not parse or whose chunks fail their crc32c is deleted (None)."""
        path = self.path(parent)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            if data[:4] != self.MAGIC:
                raise ValueError("not a staged quarter")
            (size,) = struct.unpack("<I", data[4:8])
            header = json.loads(data[8:8 + size])
            out, at = {}, 8 + size
            for coords, length in header:
                blob = data[at:at + length]
                if len(blob) != length or check_crc32c(blob) is None:
                    raise ValueError("a chunk fails its crc32c")
                out[tuple(coords)] = blob
                at += length
            if at != len(data):
                raise ValueError("trailing bytes")
            return out
        except (ValueError, struct.error):
            self.release(parent)
            return None

    def release(self, parent):
        self.path(parent).unlink(missing_ok=True)
        self.ledger.remove("staged", self._key(parent))
