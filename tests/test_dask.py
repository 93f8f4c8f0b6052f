"""The same shard tasks on a dask.distributed cluster: bytes identical to the local run."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

from wildenberg_intake.store.files import file_sha256
from wildenberg_intake.mirror import MirrorServer, build_mirror

distributed = pytest.importorskip("distributed")


def _tree(path):
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(Path(path).rglob("*")) if p.is_file()}


def test_local_cluster_with_two_worker_processes_matches_the_local_run(catalog, tmp_path):
    mirror = build_mirror(tmp_path / "mirror", shape_xyz=(1100, 520, 16), experiments=("p14",))
    with MirrorServer(mirror.root) as server, \
            distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                     dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        local = catalog.p14_saturated(base_url=server.base_url, cache_dir=str(tmp_path / "local"), progress=False)
        on_dask = catalog.p14_saturated(base_url=server.base_url, cache_dir=str(tmp_path / "dask"), progress=False)
        local_path = local.materialise()
        before = server.requests
        dask_path = on_dask.materialise(client=client)
        fetched = server.requests - before
        # Both workers did part of the work.
        workers = client.run(lambda: __import__("os").getpid())
        assert len(workers) == 2
        # Each worker process kept one request pool of `connections` threads for all its tasks.
        pools = client.run(lambda: {n: pool._max_workers for n, pool in
                                    __import__("wildenberg_intake.store.shards", fromlist=["_"])._PROCESS_POOLS.items()})
    assert all(p == {16: 16} for p in pools.values()), pools
    assert _tree(dask_path) == _tree(local_path)
    chunks = [p for p in fetched if not p.endswith(("/info", "/provenance"))]
    assert chunks and all(fetched[p] == 1 for p in chunks), "each chunk fetched once across the workers"
