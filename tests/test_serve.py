"""Programs that open the cache through `serve` or `view` see the data or an error, never absence
answered as 404 (which neuroglancer draws as zeros) for a shard the store records."""

import urllib.error
import urllib.request

from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.store.layout import array_path
from wildenberg_intake.store.engine import cache_for
from wildenberg_intake.viewer.view import LazyShards, recorded_shard_status


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def _shard_url(server, cache, name, index):
    return (f"{server.url}/wildenberg2023/{cache.root.name}/data.zarr/{array_path(name)}/c/"
            + "/".join(map(str, index)))


def test_serve_answers_503_for_a_recorded_shard_whose_file_is_gone_and_404_for_one_never_fetched(wide, catalog,
                                                                                                tmp_path):
    cache_dir = tmp_path / "cache"
    with MirrorServer(wide.root) as mirror:
        src = catalog.p14_psd(base_url=mirror.base_url, cache_dir=str(cache_dir), progress=False)
        src.materialise()
    cache = cache_for(src.plan)
    name = "labels/psd"
    index = max((i for i in cache.done_shards(name) if cache.record(name, i)["sha256"]),
                key=lambda i: cache.record(name, i)["bytes"])
    kept = sorted(i for i in cache.done_shards(name) if i != index and cache.record(name, i)["sha256"])[0]
    cache.shard_file(name, index).unlink()  # lost from a complete store
    with MirrorServer(cache_dir, token=True, absent=lambda path: recorded_shard_status(cache_dir, path)) as server:
        assert _get(_shard_url(server, cache, name, index))[0] == 503
        assert _get(_shard_url(server, cache, name, kept)) == (200, cache.shard_file(name, kept).read_bytes())
        assert _get(_shard_url(server, cache, name, (9, 9, 9)))[0] == 404  # outside: nothing recorded


def test_view_sends_the_right_bytes_for_a_shard_evicted_between_its_check_and_its_send(wide, catalog, tmp_path):
    cache_dir = tmp_path / "cache"
    with MirrorServer(wide.root) as mirror:
        src = catalog.p14_psd(base_url=mirror.base_url, cache_dir=str(cache_dir), progress=False)
        hook = LazyShards([src])
        cache = cache_for(src.plan)
        name, index = "raw", (0, 0, 1)
        hook(f"/wildenberg2023/{cache.root.name}/data.zarr/raw/c/0/0/1")  # made, as `view` makes it
        want = cache.shard_file(name, index).read_bytes()

        def before(path):
            hook(path)  # the shard is recorded here...
            cache.evict(name, index)  # ...and another request's budget evicts it before the send
        with MirrorServer(cache_dir, token=True, before=before, absent=hook.absent) as server:
            assert _get(_shard_url(server, cache, name, index)) == (200, want)
        cache.shard_file(name, index).unlink()  # deleted behind the store's back: recorded, no file
        with MirrorServer(cache_dir, token=True, before=hook, absent=hook.absent) as server:
            assert _get(_shard_url(server, cache, name, index))[0] == 503
