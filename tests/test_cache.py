"""The cache's own shard encoder writes exactly the bytes zarr-python writes."""

import numpy as np
import pytest
import zarr

from wildenberg_intake.cache import CHUNKS, SHARDS, StoreCache, compressor, encode_shard, shard_box, shard_grid


@pytest.mark.parametrize("dtype,is_label,codec", [("uint8", False, "zstd1"), ("uint8", True, "zstd3"),
                                                  ("uint32", True, "zstd3"), ("uint32", True, "zstd6"),
                                                  ("uint8", False, "lz4hc")])
def test_encode_shard_equals_zarr_python(dtype, is_label, codec, tmp_path):
    rng = np.random.default_rng(0)
    shape = (200, 700, 530)  # edge shards are partial; some inner chunks are empty
    data = np.zeros(shape, dtype=dtype)
    data[:150, 100:600, 50:] = rng.integers(0, 5000 if dtype == "uint32" else 255, size=(150, 500, 480))
    data[130:140] = 0
    arr = zarr.create_array(store=str(tmp_path / "z"), shape=shape, chunks=CHUNKS, shards=SHARDS, dtype=dtype,
                            fill_value=0, compressors=compressor(is_label, codec))
    arr[:] = data
    cache = StoreCache(tmp_path, "x")
    for index in shard_grid(shape):
        start, stop = shard_box(index, shape)
        ours = encode_shard(data[tuple(slice(a, b) for a, b in zip(start, stop))], codec, is_label)
        path = tmp_path / "z" / "c" / "/".join(map(str, index))
        assert ours == (path.read_bytes() if path.exists() else None), index
    # And zarr reads what we write.
    out = zarr.create_array(store=str(tmp_path / "ours"), shape=shape, chunks=CHUNKS, shards=SHARDS, dtype=dtype,
                            fill_value=0, compressors=compressor(is_label, codec))
    for index in shard_grid(shape):
        start, stop = shard_box(index, shape)
        blob = encode_shard(data[tuple(slice(a, b) for a, b in zip(start, stop))], codec, is_label)
        if blob is not None:
            target = tmp_path / "ours" / "c" / "/".join(map(str, index))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
    np.testing.assert_array_equal(out[:], data)
    assert cache  # noqa


def test_fast_reader_equals_zarr_on_random_windows(tmp_path):
    from wildenberg_intake.reader import ShardedArrayReader
    rng = np.random.default_rng(1)
    shape = (150, 600, 530)
    data = np.zeros(shape, dtype="uint32")
    data[20:140, 50:580, :500] = rng.integers(0, 70000, size=(120, 530, 500))
    folder = tmp_path / "arr"
    arr = zarr.create_array(store=str(folder), shape=shape, chunks=CHUNKS, shards=SHARDS, dtype="uint32",
                            fill_value=0, compressors=compressor(True, "zstd6"))
    arr[:] = data
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
