"""The streaming merge's pipeline (:mod:`training.merge.files`, :mod:`training.merge.nmodel`): one reader thread
per input, compute workers, a writer thread; and the torch thread budget for the arithmetic.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


_DONE = object()

# methods whose per-tensor arithmetic is one or two passes over memory: torch's OpenMP threads gain nothing
# there, and between the thousands of short parallel regions they spin-wait on the cores the reader, hash and
# writer threads need (benchmarks/merge.py on 2 cores: 7.4 s → 3.3 s user CPU for the same merge).
_MEMORY_BOUND = ("weighted_sum", "add_difference")
MAX_WORKERS = 8


def available_cores() -> int:
    """CPU cores this process may run on (``sched_getaffinity`` where available, else ``os.cpu_count()``)."""
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def thread_budget(pipeline_threads: int, memory_bound: bool = False) -> int:
    """torch intra-op threads for the merge arithmetic while ``pipeline_threads`` reader / writer threads run.

    Memory-bound methods (one or two passes over each tensor) get 1. The others (TIES, DARE, DELLA, SLERP,
    train difference, model stock) get the cores the pipeline leaves: ``max(1, cores − pipeline_threads)``,
    never more than torch's current setting. Leaving torch's default (one OpenMP thread per core) on while the
    reader / hash / writer threads run oversubscribes the cores: the OpenMP workers spin-wait between the many
    short parallel regions on the cores the pipeline needs (issue 19: TIES 262 s → 116 s with one thread on 2
    cores). Results do not depend on it (same kernels, same bits).
    """
    if memory_bound:
        return 1
    return max(1, min(torch.get_num_threads(), available_cores() - int(pipeline_threads)))


def compute_workers(memory_bound: bool = False) -> int:
    """How many keys the streaming merge computes at once (one worker thread each, one torch thread each).

    Memory-bound methods (weighted sum, add difference: one or two passes per tensor) get 1 worker: the
    arithmetic is a fraction of the reading and writing. The compute-bound methods (TIES, DARE, DELLA, SLERP,
    train difference, model stock) get one worker per available core, each running torch on one thread:
    independent keys in parallel keep every core busy without OpenMP's spin-waiting between the many short
    parallel regions of a single key (see :func:`thread_budget`), which is how sd-mecha's ``merge(threads=…)``
    spends its cores too (``sd_mecha/merging.py``: a ``ThreadPoolExecutor`` over keys). The reader / writer
    threads mostly wait on the workers for these methods. Results do not depend on it (each key is computed by
    the same single-threaded kernels whichever worker runs it).
    Capped at :data:`MAX_WORKERS` (each worker holds a few float32 copies of its key's tensors).
    """
    return 1 if memory_bound else max(1, min(available_cores(), MAX_WORKERS))


def arithmetic_threads(workers: int, pipeline_threads: int, memory_bound: bool = False) -> int:
    """torch threads for the arithmetic: 1 per worker when several workers share the cores, else
    :func:`thread_budget`."""
    return 1 if workers > 1 else thread_budget(pipeline_threads, memory_bound)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (``None``: unchanged) and restore the previous count.
    Results do not depend on it (torch's element-wise kernels give the same bits for any thread count)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: jobs are handed between the threads in batches of about this many bytes (one large tensor is a batch of its
#: own): every hand-over wakes a thread, and on a busy machine each wake-up waits for a time slice, so 200 small
#: tensors handed over one by one cost seconds (benchmarks/merge.py at load 14: 3.5 s → see README)
BATCH_BYTES = 16 << 20


def _batches(jobs) -> list[list]:
    """``jobs`` in order, grouped into runs of about :data:`BATCH_BYTES` (by ``job.shape`` × ``job.out_dtype``)."""
    out: list[list] = []
    cur: list = []
    size = 0
    for job in jobs:
        shape, dt = getattr(job, "shape", None), getattr(job, "out_dtype", None)
        n = 1
        for d in shape or ():
            n *= int(d)
        nb = n * (dt.itemsize if isinstance(dt, torch.dtype) else 4)
        if cur and size + nb > BATCH_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(job)
        size += nb
    if cur:
        out.append(cur)
    return out


def _pipeline(jobs, readers, compute, write, progress, depth: int = 3, workers: int = 1) -> None:
    """One reader thread per input → compute (``workers`` threads) → write (thread), each ``depth`` tensors ahead.

    ``readers[i] = (read, finish)``: ``read(job)`` returns input ``i``'s tensor for ``job`` (or ``None`` when
    the job does not need it), ``finish()`` (or ``None``) runs on that reader's thread after its last job;
    ``compute(job, [t_0, t_1, …])`` returns the tensor ``write(key, tensor)`` appends. One thread per input
    lets A and B be read and hashed (page-cache copies and SHA-256 release the GIL) on both cores at once
    while the arithmetic and the output writes overlap them. ``workers`` > 1 computes that many keys at once
    on a thread pool (torch releases the GIL); results are written in job order whatever order they finish in.
    ``compute`` must then be safe to call from several threads. Any exception in a stage stops the others and
    is re-raised here (the caller's writer then removes its temporary file); ``progress(done, total)`` runs on
    the calling thread after each key is handed to the writer and may raise to cancel. Jobs travel between the
    threads in batches (:func:`_batches`); each job is still read, computed and written on its own.
    """
    batches = _batches(jobs)
    stop = threading.Event()
    errors: list[BaseException] = []
    q_ins = [queue.Queue(maxsize=depth) for _ in readers]
    q_out: queue.Queue = queue.Queue(maxsize=depth)

    def put(q, item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return _DONE

    def reader(read, finish, q):
        try:
            for batch in batches:
                if not put(q, [read(job) for job in batch]):
                    return
            if finish is not None:
                finish()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
            stop.set()

    def writer():
        try:
            while True:
                item = get(q_out)
                if item is _DONE:
                    return
                for key, tensor in item:
                    write(key, tensor)
                del item
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, args=(r, f, q), daemon=True) for (r, f), q in zip(readers, q_ins)]
    threads.append(threading.Thread(target=writer, daemon=True))
    for t in threads:
        t.start()
    pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="merge-compute") if workers > 1 else None
    pending: collections.deque = collections.deque()  # (batch, future or results), in job order
    total, done = len(jobs), 0

    def compute_batch(batch, tensors):
        return [(job.key, compute(job, ts)) for job, ts in zip(batch, tensors)]

    def hand_over() -> bool:
        nonlocal done
        batch, res = pending.popleft()
        out = res.result() if pool is not None else res
        if not put(q_out, out):
            return False
        for _ in batch:
            done += 1
            if progress is not None:
                progress(done, total)
        return True

    try:
        ok = True
        for batch in batches:
            per_input = [get(q) for q in q_ins]
            if any(t is _DONE for t in per_input):
                ok = False
                break
            tensors = list(zip(*per_input))  # per job: (t_0, t_1, …)
            del per_input
            pending.append((batch, pool.submit(compute_batch, batch, tensors) if pool is not None
                            else compute_batch(batch, tensors)))
            del tensors
            while ok and len(pending) > (int(workers) if pool is not None else 0):  # one queued per pool
                ok = hand_over()
            if not ok:
                break
        while ok and pending:
            ok = hand_over()
        put(q_out, _DONE)
    except BaseException:
        stop.set()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
