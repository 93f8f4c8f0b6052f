"""The cache's own shard encoder writes exactly the bytes zarr-python writes."""

import numpy as np
import pytest
import zarr

from wildenberg_intake.store.format import CHUNKS, SHARDS, compressors, encode_shard
from wildenberg_intake.store.layout import shard_box, shard_grid
from wildenberg_intake.store.cache import StoreCache


@pytest.mark.parametrize("dtype,is_label,codec", [("uint8", False, "zstd1"), ("uint8", True, "zstd3"),
                                                  ("uint32", True, "zstd3"), ("uint32", True, "zstd6"),
                                                  ("uint8", False, "lz4hc")])
def test_encode_shard_equals_zarr_python(dtype, is_label, codec, tmp_path):
    rng = np.random.default_rng(0)
    shape = (150, 560, 530)  # 2 x 2 x 2 shards, the far ones partial; some inner chunks are empty
    data = np.zeros(shape, dtype=dtype)
    data[:140, 300:540, 300:] = rng.integers(0, 5000 if dtype == "uint32" else 255, size=(140, 240, 230))
    data[100:120] = 0
    arr = zarr.create_array(store=str(tmp_path / "z"), shape=shape, chunks=CHUNKS, shards=SHARDS, dtype=dtype,
                            fill_value=0, compressors=compressors(is_label, codec))
    arr[:] = data
    for index in shard_grid(shape):
        start, stop = shard_box(index, shape)
        ours = encode_shard(data[tuple(slice(a, b) for a, b in zip(start, stop))], codec, is_label)
        path = tmp_path / "z" / "c" / "/".join(map(str, index))
        assert ours == (path.read_bytes() if path.exists() else None), index
    # And zarr reads what we write.
    out = zarr.create_array(store=str(tmp_path / "ours"), shape=shape, chunks=CHUNKS, shards=SHARDS, dtype=dtype,
                            fill_value=0, compressors=compressors(is_label, codec))
    for index in shard_grid(shape):
        start, stop = shard_box(index, shape)
        blob = encode_shard(data[tuple(slice(a, b) for a, b in zip(start, stop))], codec, is_label)
        if blob is not None:
            target = tmp_path / "ours" / "c" / "/".join(map(str, index))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
    np.testing.assert_array_equal(out[:], data)


def test_fast_reader_equals_zarr_on_random_windows(tmp_path):
    """The package's reader over a store written shard by shard with its records, against the
    data and against zarr-python reading the same files."""
    from wildenberg_intake.store.format import encode_shard
    from wildenberg_intake.store.layout import array_path, shard_box, shard_grid
    from wildenberg_intake.store.cache import StoreCache
    from wildenberg_intake.store.reader import ShardedArrayReader
    rng = np.random.default_rng(1)
    shape = (150, 600, 530)
    data = np.zeros(shape, dtype="uint32")
    data[20:140, 50:580, :500] = rng.integers(0, 70000, size=(120, 530, 500))
    cache = StoreCache(tmp_path, "p14-test")
    cache.initialise({"test": 1}, {})
    cache.ensure_array("labels/seg", shape, "uint32", True, {}, codec="zstd6", ome={"name": "seg"})
    for index in shard_grid(shape):
        start, stop = shard_box(index, shape)
        block = np.ascontiguousarray(data[tuple(slice(a, b) for a, b in zip(start, stop))])
        blob = encode_shard(block, "zstd6", True)
        cache.write_shard("labels/seg", index, None if blob is None else [blob])
        cache.mark_done("labels/seg", index)
    folder = cache.zarr_path / array_path("labels/seg")
    np.testing.assert_array_equal(zarr.open_array(str(folder), mode="r")[:], data)
    reader = ShardedArrayReader(folder, cache_mb=8)  # small: the LRU evicts
    assert reader.shape == shape and reader.dtype == np.uint32 and reader.ndim == 3
    for _ in range(40):
        start = [int(rng.integers(0, n)) for n in shape]
        stop = [int(min(n, a + rng.integers(1, 300))) for a, n in zip(start, shape)]
        key = tuple(slice(a, b) for a, b in zip(start, stop))
        np.testing.assert_array_equal(reader[key], data[key])
    np.testing.assert_array_equal(reader[:], data)
    import pickle
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(reader))[5:9], data[5:9])


def test_shard_buffer_is_zeroed_unless_the_chunks_tile_the_shard():
    """The engine skips zeroing a reused shard buffer only when its chunks cover every voxel."""
    from wildenberg_intake.store.shards import shard_buffer as _shard_buffer, _voxels_covered
    from wildenberg_intake.source.layers import LayerInfo
    info = LayerInfo(url="http://x", mip=0, swap_xy=False, dtype="uint8", encoding="raw", resolution_zyx=(40, 12, 12),
                     offset_zyx=(3, 5, 7), size_zyx=(20, 30, 40), chunk_zyx=(8, 16, 16), mips=(0,), info_sha256="")
    start, stop = np.array([4, 6, 8]), np.array([21, 33, 45])  # inside the layer, cutting through chunks
    grids = info.chunks_in(start, stop)
    assert _voxels_covered(info, grids, start, stop) == int(np.prod(stop - start))
    dropped = info.chunk_box(grids[4])
    inside = np.clip(np.minimum(dropped[1], stop) - np.maximum(dropped[0], start), 0, None)
    assert _voxels_covered(info, grids[:4] + grids[5:], start, stop) == int(np.prod(stop - start)) - int(np.prod(inside))
    # A box reaching past the layer's edge: only the part inside it is covered.
    stop_out = np.array([30, 33, 45])
    assert _voxels_covered(info, info.chunks_in(start, stop_out), start, stop_out) == int(np.prod([19, 27, 37]))

    stale = _shard_buffer((4, 5, 6), "uint32", zeroed=False)
    stale.fill(7)
    assert np.all(_shard_buffer((4, 5, 6), "uint32", zeroed=False) == 7)  # the same memory, not cleared
    assert not _shard_buffer((4, 5, 6), "uint32", zeroed=True).any()


@pytest.mark.parametrize("dtype,is_label,codec", [("uint8", False, "zstd1"), ("uint8", False, "lz4"),
                                                  ("uint32", True, "zstd3"), ("uint64", True, "zstd6")])
def test_array_and_group_metadata_equal_zarr_pythons(dtype, is_label, codec, tmp_path):
    import json
    from wildenberg_intake.store.layout import array_metadata, group_metadata
    attributes = {"source_url": "x", "nested": {"a": [1, 2]}}
    zarr.create_array(store=str(tmp_path / "a"), shape=(80, 700, 530), chunks=CHUNKS, shards=SHARDS, dtype=dtype,
                      fill_value=0, compressors=compressors(is_label, codec), dimension_names=("z", "y", "x"),
                      attributes=attributes, zarr_format=3)
    assert array_metadata((80, 700, 530), dtype, is_label, codec, attributes) == \
        json.loads((tmp_path / "a" / "zarr.json").read_text())
    zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3, attributes=attributes)
    assert group_metadata(attributes) == json.loads((tmp_path / "g" / "zarr.json").read_text())
    with pytest.raises(ValueError, match=r"codec='zstd9' is not supported; allowed: \['zstd1'"):
        array_metadata((1, 1, 1), dtype, is_label, "zstd9", {})


@pytest.mark.parametrize("shape", [(2, 4, 4), (1, 1, 1), (3, 5, 2), (8, 8, 8), (4, 1)])
def test_morton_order_is_zarrs(shape, tmp_path):
    """The order in which zarr-python lays out the inner chunks of a shard it writes (read from the
    shard file's index: chunks sorted by offset), not from zarr's internals, which change names."""
    from zarr.codecs import ShardingCodec
    from wildenberg_intake.store.format import morton_order
    inner = (2,) * len(shape)
    array = zarr.create_array(str(tmp_path / "a"), shape=tuple(n * c for n, c in zip(shape, inner)), dtype="uint8",
                              chunks=tuple(n * c for n, c in zip(shape, inner)), fill_value=0,
                              serializer=ShardingCodec(chunk_shape=inner), compressors=None)
    array[...] = 1  # every inner chunk non-empty
    data = (tmp_path / "a" / "c" / "/".join("0" * len(shape))).read_bytes()
    n = int(np.prod(shape))
    index = np.frombuffer(data[-(16 * n + 4):-4], dtype="<u8").reshape(shape + (2,))
    written = sorted(np.ndindex(*shape), key=lambda c: int(index[c][0]))
    assert morton_order(shape) == [tuple(int(i) for i in c) for c in written]


def test_an_array_of_another_shape_is_refused(tmp_path):
    cache = StoreCache(tmp_path, "x")
    cache.initialise({"k": 1}, {})
    cache.ensure_array("raw", (10, 20, 30), "uint8", False, {}, "zstd1")
    cache.ensure_array("raw", (10, 20, 30), "uint8", False, {}, "zstd1")  # the same again: fine
    with pytest.raises(RuntimeError, match=r"has shape \[10, 20, 30\] and dtype uint8; expected \(10, 20, 31\) "
                                           r"and uint32\. Delete .* to rebuild it"):
        cache.ensure_array("raw", (10, 20, 31), "uint32", False, {}, "zstd1")
    assert zarr.open_array(str(cache.zarr_path), path="raw", mode="r").shape == (10, 20, 30)


def test_malloc_tuning_leaves_a_users_own_malloc_settings_alone(monkeypatch):
    from wildenberg_intake.store import shards as engine

    class Libc:  # records what would be set in glibc
        def __init__(self, refuse=()):
            self.calls, self.refuse = [], refuse

        def mallopt(self, param, value):
            self.calls.append((param, value))
            return int(param not in self.refuse)

    for name in engine._MALLOC_ENV + ("WILDENBERG_INTAKE_TUNE_MALLOC",):
        monkeypatch.delenv(name, raising=False)
    libc = Libc()
    assert engine.tune_malloc(libc) is False and libc.calls == []  # a library leaves the user's process alone
    monkeypatch.setenv("WILDENBERG_INTAKE_TUNE_MALLOC", "1")  # unless asked
    assert engine.tune_malloc(libc) is True
    monkeypatch.delenv("WILDENBERG_INTAKE_TUNE_MALLOC")
    libc = Libc()
    assert engine.tune_malloc(libc, owned=True) is True  # the command line owns its process
    assert libc.calls == [(-3, 64 * 2**20), (-1, 64 * 2**20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc = Libc(refuse=(-3,))  # a glibc that caps the mmap threshold lower: the trim one is left too
    assert engine.tune_malloc(libc, owned=True) is False and libc.calls == [(-3, 64 * 2**20)]
    for name, value in (("MALLOC_MMAP_THRESHOLD_", "131072"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                        ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2"), ("WILDENBERG_INTAKE_TUNE_MALLOC", "0")):
        monkeypatch.setenv(name, value)
        libc = Libc()
        assert engine.tune_malloc(libc, owned=True) is False and libc.calls == [], name
        monkeypatch.delenv(name)
    import platform
    if platform.libc_ver()[0] == "glibc":  # the real call works where glibc is (CI's Debian)
        assert engine._LIBC is not None and engine.tune_malloc(owned=True) is True
    else:
        assert engine._LIBC is None and engine.tune_malloc(owned=True) is False


def test_content_digest_equals_xxh3_of_the_voxels_whatever_slabs_are_zeros():
    """Slabs said to be zeros are counted, not hashed, yet the digest is the xxh3-128 of every byte
    in order: all zeros (of a size over the 1 MB zero buffer), zeros before, after and between data."""
    import xxhash
    from wildenberg_intake.store.format import ContentDigest
    rng = np.random.default_rng(3)
    data = rng.integers(0, 255, size=(4, 300, 500)).astype(np.uint8)
    zeros = np.zeros((3, 700, 600), np.uint32)  # 5 MB
    for slabs in ([zeros], [zeros, zeros[:1]], [zeros, data], [data, zeros], [zeros, data, zeros[:2], data], [data]):
        digest = ContentDigest()
        for slab in slabs:
            digest.update(slab, zeros=not slab.any())
        assert digest.hexdigest() == xxhash.xxh3_128(b"".join(s.tobytes() for s in slabs)).hexdigest()


def test_durable_writes_make_files_as_open_does_so_a_shared_group_cache_stays_writable(tmp_path):
    """The user's umask decides a written file's mode (a group sharing a cache uses umask 002), as
    open() would: the flocked temporary file must not narrow it."""
    import os
    from wildenberg_intake.store.files import durable_write
    old = os.umask(0o002)
    try:
        durable_write(tmp_path / "record", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "record").stat().st_mode & 0o777 == 0o664
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record"]
