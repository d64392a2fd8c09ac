"""`posttrain-torchrun`: torchrun (torch.distributed.run, the same arguments and behaviour),
quiet when its workers stopped for a preemption.

torchrun takes any nonzero exit of a worker for a failure: an error line per node and a
ChildFailedError traceback. Exit 75 (EXIT_PREEMPTED) is posttrain's "saved what it finished,
re-run the same command": it exits 75 with one line from posttrain, and any other failure is
reported as torchrun reports it.
"""

from __future__ import annotations

import logging
import sys

from posttrain.preemption import EXIT_PREEMPTED


class _NotPreempted(logging.Filter):
    """Drops torchrun's "failed (exitcode: 75)" line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"failed (exitcode: {EXIT_PREEMPTED})" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_NotPreempted())
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as failed:
        if all(failure.exitcode == EXIT_PREEMPTED for failure in failed.failures.values()):
            return EXIT_PREEMPTED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
