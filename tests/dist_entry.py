"""Entry script for tests/test_distributed.py under the real launcher (``accelerate launch ... dist_entry.py
train --config X``): the ``conceptlab`` CLI, with a failure injected in one process so the test can watch the
run end. ``CONCEPTLAB_TEST_FAIL_RANK`` / ``CONCEPTLAB_TEST_FAIL_STEP``: that process raises ``RuntimeError`` at
its N-th trained micro-batch. Test-only: the package itself has no such switch."""

from __future__ import annotations

import os
import sys


def _inject_failure() -> None:
    rank, step = os.environ.get("CONCEPTLAB_TEST_FAIL_RANK"), os.environ.get("CONCEPTLAB_TEST_FAIL_STEP")
    if rank is None or os.environ.get("RANK") != rank:
        return
    from conceptlab.training.lora import trainer

    real, calls = trainer.diffusion_loss, {"n": 0}

    def loss(host, *a, **k):
        if type(host).__name__ != "_DrawOnlyHost":
            calls["n"] += 1
            if calls["n"] >= int(step):
                raise RuntimeError(f"injected failure in process {rank}")
        return real(host, *a, **k)

    trainer.diffusion_loss = loss


if __name__ == "__main__":
    _inject_failure()
    from conceptlab.cli import main

    sys.exit(main(sys.argv[1:]))
