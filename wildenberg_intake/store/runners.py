"""Runners: run a list of small tasks on threads or on a dask.distributed cluster, bounded and
cancellable, reporting each result as it completes. The store's materialisation and the synapse
tables use the same two."""

from __future__ import annotations

import concurrent.futures as cf

from ..source.transfer import Cancelled


def run_threads(task, jobs, workers: int, finished, cancel=lambda: None):
    """`task(*job)` for each job on `workers` threads, `finished(job, result)` as each completes.
    On the first failure `cancel()` stops the requests in flight and the waits for retries, so the
    run ends promptly with that failure (not with a task cancelled because of it)."""
    _run_pool(cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wildenberg"), task, jobs, workers,
              finished, cancel)


def run_processes(task, jobs, workers: int, finished, cancel=lambda: None):
    """As `run_threads`, on `workers` worker processes: for work that holds the GIL (e.g.
    connected-components-3d). Jobs and results must pickle. The workers are forked, as PyTorch's
    loader workers are: spawn and forkserver would run the caller's script again in each worker
    unless it has an `if __name__ == "__main__":` guard, which notebooks and short scripts lack."""
    import multiprocessing
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    _run_pool(pool, task, jobs, workers, finished, cancel)


def _run_pool(pool, task, jobs, workers: int, finished, cancel):
    pending = {}
    queue = iter(jobs)
    try:
        while True:
            # Bounded submission keeps memory proportional to the workers, not to the volume.
            for job in queue:
                pending[pool.submit(task, *job)] = job
                if len(pending) >= workers + 1:
                    break
            if not pending:
                break
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                result = future.result()  # re-raises a task's error
                finished(pending.pop(future), result)
    except BaseException as first:
        for future in pending:
            future.cancel()
        cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        causes = [f.exception() for f in pending if not f.cancelled() and f.exception() is not None]
        root = next((e for e in [first, *causes] if not isinstance(e, Cancelled)), first)
        raise root
    pool.shutdown(wait=True)


def run_on_dask(client, task, jobs, finished):
    """`task(*job)` for each job on a dask.distributed cluster (a Client or a scheduler address),
    `finished(job, result)` as each completes; the rest are cancelled on the first failure."""
    from dask.distributed import Client, as_completed
    own = isinstance(client, str)
    if own:  # made here from a scheduler address: closed here too
        client = Client(client)
    try:
        futures = {client.submit(task, *job, pure=False, priority=-n): job for n, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                finished(futures[future], future.result())
        except BaseException:
            client.cancel(list(futures))
            raise
    finally:
        if own:
            client.close()
