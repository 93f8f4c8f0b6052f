"""The on-disk format of a store's arrays: chunk and shard geometry, codecs, and the encoding of
inner chunks and shard files exactly as zarr v3's sharding codec lays them out (tests check the
bytes against zarr-python's), plus the content digest of a shard's voxels."""

from __future__ import annotations

import functools
import hashlib
import itertools

import numpy as np

# 3: a crc32c checksum after every inner chunk (zarr v3's crc32c codec), so that every reader
# (zarr-python, tensorstore, the package's own) checks each chunk it decodes.
# 4: the pyramid made on transfer (each level from the level below while it is in memory, staged
# as encoded quarters), and each shard record holds its file's index crc32c, so that a reader
# tells a missing, truncated or swapped shard file from an all-zero shard without hashing it.
# 5: hashes where they are read, with what is fast: level 0 records its voxels' xxh3-128 (locks and
# synapse tables read it), pyramid levels none; no shard-file sha256 (every byte of a shard file is
# under a crc32c: its chunks' and its index's, see `shard_file_problem`); label levels zstd 1.
LAYOUT_VERSION = 5
CHUNKS = (64, 128, 128)
SHARDS = (128, 512, 512)
# Blosc codecs a store may use, by name. Raw EM defaults to zstd 1, which measured ~13x faster to
# encode than the reference's zstd 6 for ~2% more disk. Labels are zstd 3 without shuffle: on
# label volumes (long runs of one id) it measured 4x smaller than the reference's zstd 6 +
# bitshuffle, 7x faster to encode and 1.7x faster to decode (README, benchmarks/codecs.py).
CODECS = {"zstd1": ("zstd", 1), "zstd3": ("zstd", 3), "zstd6": ("zstd", 6), "lz4": ("lz4", 5),
          "lz4hc": ("lz4hc", 5)}
LABEL_CODEC = "zstd3"
# Pyramid levels of labels: zstd 1 measured half zstd 3's encode time for +28% of the levels' small
# size (~1% of a store); lz4 5x faster but 3.8x larger. EM levels keep the raw codec.
LEVEL_LABEL_CODEC = "zstd1"
# The digest of a shard's voxels that level 0 records: 36 GB/s here against sha256's 1.8.
CONTENT_DIGEST = "xxh3_128"
# Part of every store's key: a change here must give new stores.
LAYOUT = {"chunks": list(CHUNKS), "shards": list(SHARDS), "shuffle": "byte shuffle for raw, none for labels",
          "inner_checksum": "crc32c", "level_label_codec": LEVEL_LABEL_CODEC,
          "records": "bytes, index_crc32c, content_xxh3 (level 0), missing_chunks"}


def shuffle_of(is_label: bool) -> str:
    """Blosc shuffle: none for labels (runs of equal ids compress best unshuffled), byte for raw."""
    return "noshuffle" if is_label else "shuffle"


def compressor(is_label: bool, codec: str = LABEL_CODEC):
    """zarr's Blosc codec for an array of the cache: `codec` with `shuffle_of(is_label)`."""
    from zarr.codecs import BloscCodec
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r} is not supported; allowed: {list(CODECS)}")
    cname, clevel = CODECS[codec]
    return BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle_of(is_label))


def compressors(is_label: bool, codec: str = LABEL_CODEC) -> tuple:
    """zarr's bytes-to-bytes codecs of a cache array's inner chunks: `compressor`, then crc32c."""
    from zarr.codecs import Crc32cCodec
    return compressor(is_label, codec), Crc32cCodec()


def blosc_codec(codec: str, is_label: bool):
    """numcodecs' Blosc for `codec` with `shuffle_of(is_label)`: the bytes `compressor` describes."""
    from numcodecs import Blosc
    cname, clevel = CODECS[codec]
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE}[shuffle_of(is_label)]
    return Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=0)


def _is_empty(chunk: np.ndarray) -> bool:
    """All voxels equal the fill value 0 (for unsigned integers max() is ~3x faster than any())."""
    return chunk.max() == 0 if chunk.dtype.kind == "u" else not chunk.any()


def encode_chunks(block: np.ndarray, codec: str, is_label: bool, first=(0, 0, 0)) -> dict:
    """Blosc bytes of each inner chunk of `block` that is not all fill value, by its coordinates in
    the shard (`first`: those of the block's first inner chunk; a block may be a z-slab of a shard).
    Edge chunks are padded with the fill value 0, as zarr stores them."""
    blosc = blosc_codec(codec, is_label)
    # One contiguous buffer for every inner chunk: a fresh 1-4 MB array per chunk costs page faults
    # that measured more than the copy.
    scratch = np.empty(CHUNKS, dtype=block.dtype.newbyteorder("<"))
    encoded = {}
    for local in itertools.product(*(range(-(-n // c)) for n, c in zip(block.shape, CHUNKS))):
        chunk = block[tuple(slice(i * c, (i + 1) * c) for i, c in zip(local, CHUNKS))]
        if chunk.shape != CHUNKS:
            scratch.fill(0)
        scratch[tuple(slice(0, n) for n in chunk.shape)] = chunk
        if not _is_empty(scratch):
            body = blosc.encode(scratch)
            # zarr v3's crc32c codec: the checksum of the Blosc bytes, little-endian, after them.
            encoded[tuple(i + f for i, f in zip(local, first))] = bytes(body) + _crc32c(body)
    return encoded


def encode_chunk(chunk: np.ndarray, chunk_shape, codec: str, is_label: bool) -> bytes:
    """One chunk of an unsharded array of `array_metadata(..., chunk_shape=...)`: padded to
    `chunk_shape` with the fill value 0, Blosc, then its crc32c."""
    full = np.zeros(chunk_shape, dtype=chunk.dtype.newbyteorder("<"))
    full[tuple(slice(0, n) for n in chunk.shape)] = chunk
    body = blosc_codec(codec, is_label).encode(full)
    return bytes(body) + _crc32c(body)


def _crc32c(data) -> bytes:
    import google_crc32c
    return int(google_crc32c.value(bytes(data))).to_bytes(4, "little")


def check_crc32c(blob: bytes) -> bytes | None:
    """The payload of an inner chunk stored with zarr's crc32c codec, or None if its checksum fails."""
    return blob[:-4] if len(blob) >= 4 and _crc32c(blob[:-4]) == blob[-4:] else None


def morton_order(shape) -> list[tuple]:
    """Coordinates of a grid of `shape` in compressed Morton order (neuroglancer's), the order in
    which zarr's sharding lays out inner chunks (a test checks it against zarr's own)."""
    bits = tuple((n - 1).bit_length() for n in shape)
    order = []
    for code in range(2 ** sum(bits)):
        coords, bit = [0] * len(shape), 0
        for coord_bit in range(max(bits)):
            for dim in range(len(shape)):
                if coord_bit < bits[dim]:
                    coords[dim] |= ((code >> bit) & 1) << coord_bit
                    bit += 1
        if all(c < n for c, n in zip(coords, shape)):
            order.append(tuple(coords))
    return order


_PER_SHARD = tuple(s // c for s, c in zip(SHARDS, CHUNKS))
_SHARD_ORDER = morton_order(_PER_SHARD)


def assemble_shard(encoded: dict) -> list | None:
    """A shard file from its encoded inner chunks, as the pieces to write one after the other: the
    chunks in Morton order, then the index of (offset, length) uint64 pairs in C order with its
    crc32c. None if no chunk (zarr writes no file). Pieces, not one joined copy: joining a 32 MB
    shard cost a fresh buffer's page faults and a copy for each shard written."""
    import google_crc32c
    if not encoded:
        return None
    index = np.full(_PER_SHARD + (2,), 2**64 - 1, dtype="<u8")
    parts, offset = [], 0
    for coords in _SHARD_ORDER:
        data = encoded.get(coords)
        if data is not None:
            index[coords] = (offset, len(data))
            parts.append(data)
            offset += len(data)
    index_bytes = index.tobytes()
    crc = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
    return parts + [index_bytes, crc]


def encode_shard(block: np.ndarray, codec: str, is_label: bool) -> bytes | None:
    """Encode one whole output shard the way zarr-python does, without its per-chunk overhead.

    zarr v3 sharding: inner chunks (padded to CHUNKS with the fill value 0) encoded with the bytes
    codec and Blosc, all-zero chunks left out, laid out in Morton order, then the index with its
    crc32c. None for an all-zero shard (zarr writes no file then). Tests check the bytes equal
    zarr-python's own.
    """
    parts = assemble_shard(encode_chunks(block, codec, is_label))
    return None if parts is None else b"".join(parts)


def new_digest(algorithm: str = CONTENT_DIGEST):
    """A hashlib-like object for `algorithm`: CONTENT_DIGEST, or "sha256" (what layout 4 recorded,
    and locks made then pin)."""
    if algorithm == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"algorithm={algorithm!r} is not a content digest; allowed: {[CONTENT_DIGEST, 'sha256']}")


_ZEROS = bytes(2**20)


@functools.lru_cache(maxsize=64)
def _digest_of_zeros(nbytes: int) -> str:
    digest = new_digest()
    for _ in range(nbytes // len(_ZEROS)):
        digest.update(_ZEROS)
    digest.update(_ZEROS[:nbytes % len(_ZEROS)])
    return digest.hexdigest()


class ContentDigest:
    """The CONTENT_DIGEST of a shard's voxels (C order), fed slab by slab. Slabs known to be zeros
    are counted, not hashed, until data follows them: an empty shard (a region the server lacks)
    costs one hash per shard size per process, not one per shard."""

    def __init__(self):
        self._digest, self._zeros, self._data = new_digest(), 0, False

    def update(self, block: np.ndarray, zeros: bool = False):
        if zeros:
            self._zeros += block.nbytes
            return
        self._feed_zeros()
        self._digest.update(np.ascontiguousarray(block))
        self._data = True

    def _feed_zeros(self):
        while self._zeros:
            n = min(self._zeros, len(_ZEROS))
            self._digest.update(_ZEROS[:n])
            self._zeros -= n

    def hexdigest(self) -> str:
        if not self._data:
            return _digest_of_zeros(self._zeros)
        self._feed_zeros()
        return self._digest.hexdigest()


class ShardFileError(ValueError):
    """A shard file's bytes are not a shard; the message says what is wrong."""


def index_bytes(per_shard=_PER_SHARD) -> int:
    """Bytes of a shard file's index: an (offset, length) uint64 pair per inner chunk, its crc32c."""
    return 16 * int(np.prod(per_shard)) + 4


def shard_index(tail, size: int, per_shard=_PER_SHARD) -> np.ndarray:
    """The (offset, length) index of a shard file of `size` bytes, from its last `index_bytes`
    bytes `tail`, checked: the file holds it, it passes its crc32c and points inside the file.
    Raises `ShardFileError` naming what is wrong."""
    need = index_bytes(per_shard)
    if size < need:
        raise ShardFileError(f"{size} bytes cannot hold its {need}-byte index")
    if check_crc32c(tail) is None:
        raise ShardFileError("its index fails its crc32c")
    index = np.frombuffer(tail[:-4], dtype="<u8").reshape(tuple(per_shard) + (2,))
    used = index[..., 0] != 2**64 - 1
    if (index[used].sum(axis=1) > size - need).any():
        raise ShardFileError("its index points past the file")
    return index


def shard_file_problem(data: bytes) -> str | None:
    """What is wrong with the bytes of a shard file (None: nothing). Every byte is under a crc32c:
    the index (offset, length pairs) under its own, each chunk under the one zarr's crc32c codec
    appends, and the chunks must tile the file before the index exactly, so a changed, missing or
    extra byte anywhere is found (what a whole-file hash would find, at crc32c's speed)."""
    need = index_bytes()
    try:
        index = shard_index(memoryview(data)[max(len(data) - need, 0):], len(data))
    except ShardFileError as e:
        return str(e)
    used = index.reshape(-1, 2)
    used = used[used[:, 0] != 2**64 - 1]
    used = used[np.argsort(used[:, 0])]
    ends = used[:, 0] + used[:, 1]
    if len(used) and (used[0, 0] != 0 or (used[1:, 0] != ends[:-1]).any()) or \
            (ends[-1] if len(used) else 0) != len(data) - need:
        return "its chunks do not tile the file before its index"
    for offset, length in used:
        if check_crc32c(memoryview(data)[offset:offset + length]) is None:
            return f"its chunk at byte {offset} fails its crc32c"
    return None
