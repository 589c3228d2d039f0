"""Test harness: rank 0 of two gloo ranks ends while a gloo worker thread still has Python work to do for a pending
collective, and while the interpreter's teardown is slow, so the worker needs the GIL during finalization.

    python tests/distributed/gloo_exit.py RANK PORT sys-exit|exit-process

In training the Python work is freeing the last tensors of a finished collective (see trainer/runtime/process_exit.py);
here it is a done-callback on the collective's future, which makes the timing certain: rank 1 joins the group and
never joins the all-gather, so rank 0's all-gather times out after 1 s, inside the 5 s that rank 0 spends
finalizing its __main__ module. Rank 1 is meant to be killed by the caller.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.runtime.process_exit import exit_process


class SlowTeardown:
    """Its __del__ runs when finalization clears this module's globals, after the worker threads lose the GIL."""

    def __del__(self) -> None:
        time.sleep(5)


def main() -> None:
    rank, port, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    # The rendezvous may wait for the other rank's imports on a busy machine; the collective times out after 1 s.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    group = dist.new_group([0, 1], timeout=timedelta(seconds=1))
    if rank == 1:
        time.sleep(60)
    flat = torch.zeros(8)
    work = dist.all_gather_into_tensor(flat, flat.narrow(0, 0, 4), group=group, async_op=True)
    work.get_future().then(lambda future: None)
    print("rank 0: collective pending", flush=True)
    if mode == "exit-process":
        exit_process(0)
    sys.exit(0)


slow_teardown = SlowTeardown()

if __name__ == "__main__":
    main()
