"""Programs that open the cache through `serve` or `view` see the data or an error, never absence
answered as 404 (which neuroglancer draws as zeros) for a shard the store records."""

import urllib.error
import urllib.request

from wildenberg_intake.mirror import MirrorServer
from wildenberg_intake.store.cache import has_file
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
    index = max((i for i in cache.done_shards(name) if has_file(cache.record(name, i))),
                key=lambda i: cache.record(name, i)["bytes"])
    kept = sorted(i for i in cache.done_shards(name) if i != index and has_file(cache.record(name, i)))[0]
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


def test_a_store_fetched_through_one_server_is_found_complete_through_a_restarted_one(mirror, catalog, tmp_path):
    """A store's name derives from what the source serves, not from its address: `serve` restarted
    with a new token and port (or the same copy on another node) finds the store, zero requests."""
    cache_dir = str(tmp_path / "cache")
    with MirrorServer(mirror.root, token=True) as first:
        src = catalog.p105_psd(base_url=first.base_url, cache_dir=cache_dir, progress=False)
        want = src.read()
        assert first.requests_under("/wildenberg2023/mouse_v1_l4_p105/em/") > 0
        first_url = first.url
    with MirrorServer(mirror.root, token=True) as second:
        assert second.token != first.token and second.url != first_url
        again = catalog.p105_psd(base_url=second.base_url, cache_dir=cache_dir, progress=False)
        assert again.discover()["metadata"]["cached"] is True
        got = again.read()
        chunk_requests = [p for p in second.requests if not p.endswith("/info")]
        assert chunk_requests == []
    assert cache_for(again.plan).root == cache_for(src.plan).root
    for key in ("raw", "labels"):
        assert (got[key].values == want[key].values).all()
    assert len(list((tmp_path / "cache" / "wildenberg2023").iterdir())) == 1


def test_a_different_dataset_at_the_same_address_gets_a_store_of_its_own(mirror, wide, catalog, tmp_path):
    """The store key hashes the layers' info files: another dataset behind the same URL path is not
    taken for the cached one."""
    cache_dir = str(tmp_path / "cache")
    with MirrorServer(mirror.root) as a:
        one = cache_for(catalog.p14_psd(base_url=a.base_url, cache_dir=cache_dir, progress=False).plan)
    with MirrorServer(wide.root) as b:
        other = cache_for(catalog.p14_psd(base_url=b.base_url, cache_dir=cache_dir, progress=False).plan)
    assert one.root != other.root
