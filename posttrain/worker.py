"""One worker of a multi-process run: `python -m posttrain.worker <run folder>/resolved.yaml`.

Started by torchrun, the deepspeed launcher or accelerate (posttrain/launch.py); reads the
config the head process composed and froze, joins the process group, and runs the stage
chain. Never runs Hydra, so every rank has the same config and run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain import distributed
from posttrain.config import planned_world_size
from posttrain.errors import PosttrainError
from posttrain.pipeline import run_pipeline
from posttrain.plan import load_config
from posttrain.preemption import EXIT_PREEMPTED, RESUME, Preempted, exit_preempted


def main(argv: list[str]) -> int:
    import yaml

    if len(argv) != 1:
        print("usage: python -m posttrain.worker RUN_FOLDER/resolved.yaml", file=sys.stderr)
        return 2
    # the head process checked the launch (hostfile, GPUs) on its node; this may be another node
    cfg = load_config(yaml.safe_load(Path(argv[0]).read_text()), on_launch_node=False)
    planned, started = planned_world_size(cfg.launcher), distributed.world_size()
    if planned != started:
        print(
            f"error: the launcher started {started} processes, the config plans {planned} "
            "(launcher.nnodes x launcher.gpus)",
            file=sys.stderr,
        )
        return 1
    distributed.init_workers(cfg)
    code = 0
    try:
        run_pipeline(cfg)
    except PosttrainError as e:
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    except Preempted as e:
        if distributed.is_main():
            print(f"[posttrain] stopped by {e}; {RESUME}", flush=True)
        code = EXIT_PREEMPTED
    distributed.shutdown()
    return code


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    if exit_code == EXIT_PREEMPTED:
        exit_preempted()
    sys.exit(exit_code)
