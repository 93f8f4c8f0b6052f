"""The cache's own shard encoder writes exactly the bytes zarr-python writes."""

import numpy as np
import pytest
import zarr

from wildenberg_intake.cache import CHUNKS, SHARDS, StoreCache, compressor, encode_shard, shard_box, shard_grid


@pytest.mark.parametrize("dtype,is_label,codec", [("uint8", False, "zstd1"), ("uint8", True, "zstd6"),
                                                  ("uint32", True, "zstd6"), ("uint8", False, "lz4hc")])
def test_encode_shard_equals_zarr_python(dtype, is_label, codec, tmp_path):
    rng = np.random.default_rng(0)
    shape = (200, 700, 530)  # edge shards are partial; some inner chunks are empty
    data = np.zeros(shape, dtype=dtype)
    data[:150, 100:600, 50:] = rng.integers(0, 5000 if dtype == "uint32" else 255, size=(150, 500, 480))
    data[130:140] = 0
    arr = zarr.create_array(store=str(tmp_path / "z"), shape=shape, chunks=CHUNKS, shards=SHARDS, dtype=dtype,
                            fill_value=0, compressors=compressor(dtype, is_label, codec))
    arr[:] = data
    cache = StoreCache(tmp_path, "x")
    for index in shard_grid(shape):
        start, stop = shard_box(index, shape)
        ours = encode_shard(data[tuple(slice(a, b) for a, b in zip(start, stop))], codec, is_label)
        path = tmp_path / "z" / "c" / "/".join(map(str, index))
        assert ours == (path.read_bytes() if path.exists() else None), index
    # And zarr reads what we write.
    out = zarr.create_array(store=str(tmp_path / "ours"), shape=shape, chunks=CHUNKS, shards=SHARDS, dtype=dtype,
                            fill_value=0, compressors=compressor(dtype, is_label, codec))
    for index in shard_grid(shape):
        start, stop = shard_box(index, shape)
        blob = encode_shard(data[tuple(slice(a, b) for a, b in zip(start, stop))], codec, is_label)
        if blob is not None:
            target = tmp_path / "ours" / "c" / "/".join(map(str, index))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
    np.testing.assert_array_equal(out[:], data)
    assert cache  # noqa
