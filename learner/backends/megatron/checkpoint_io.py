"""Make megatron's dist_checkpointing write its files in the calling thread, without forking.

megatron-core 0.16.1's torch_dist save writes each bucket from a *forked* process and collects results
through a spawned multiprocessing Manager. Forking a process that runs a gRPC server (and torch's thread
pools) can deadlock the child - it did here: SaveState hung forever - and the Manager is one more
process to leak. The learner saves synchronously anyway, so this swaps both for in-process equivalents:
the buckets are written one after another by the same `write_preloaded_data` megatron uses, and results
travel through a plain thread-safe queue. Applied once, before the first save, on every rank.
"""

from __future__ import annotations

import queue

_applied = False


def write_in_process() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    results: queue.Queue = queue.Queue()

    def write_buckets_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
        local_results: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()  # JoinableQueue's get/task_done, which write_preloaded_data calls
        collected: dict | Exception = {}
        for index, bucket in enumerate(write_buckets):
            done.put(index)
            writer.write_preloaded_data(
                transform_list, index, bucket, local_results, done, use_fsync=True, use_msc=use_msc
            )
            proc_index, outcome = local_results.get()
            if isinstance(outcome, Exception):
                collected = outcome
                break
            collected[proc_index] = outcome
        global_results_queue.put(collected)

    writer.write_preloaded_data_multiproc = staticmethod(write_buckets_in_process)
    filesystem_async._get_write_results_queue = lambda: results
    _applied = True
