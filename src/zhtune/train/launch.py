"""Multi-GPU and multi-node runs: ``zhtune pt|sft --nproc_per_node N`` re-runs itself under torchrun.

The launch flags (``--nproc_per_node``, ``--nnodes``, ``--node_rank``, ``--master_addr``, ``--master_port``)
are torchrun's own and are taken out of the command line before the rest is parsed; the command then runs
again as ``python -m torch.distributed.run <launch flags> -m zhtune <command> <the other arguments>``, one
process per GPU. Started by an external ``torchrun`` (or ``accelerate launch``) instead, zhtune sees
WORLD_SIZE/LOCAL_RANK and just runs: transformers' Trainer then trains with DDP, or FSDP with
``--fsdp "full_shard auto_wrap"``, or DeepSpeed with ``--deepspeed configs/deepspeed/<file>.json``.

One node: ``zhtune sft recipe.yaml --nproc_per_node 8``. Two nodes: on each,
``zhtune sft recipe.yaml --nproc_per_node 8 --nnodes 2 --node_rank {0,1} --master_addr HOST --master_port 29500``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)
LAUNCH_FLAGS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")
COMMANDS = ("sft", "pt")  # the commands that train


def split_launch_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(launch flags, remaining arguments). Accepts ``--flag value`` and ``--flag=value``."""
    launch: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in LAUNCH_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    from zhtune.errors import ConfigError

                    raise ConfigError(f"--{name} needs a value")
                value = argv[i + 1]
                i += 1
            launch[name] = value
        else:
            rest.append(arg)
        i += 1
    return launch, rest


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch (or any launcher that sets these)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(command: str, launch: dict[str, str], rest: list[str]) -> list[str]:
    nproc = launch.get("nproc_per_node", "1")
    nnodes = launch.get("nnodes", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == "1" and "master_addr" not in launch and "master_port" not in launch:
        cmd.append("--standalone")  # one node: a free local port, no rendezvous server to name
    else:
        cmd += [f"--node_rank={launch.get('node_rank', '0')}"]
        cmd += [f"--master_addr={launch.get('master_addr', '127.0.0.1')}"]
        cmd += [f"--master_port={launch.get('master_port', '29500')}"]
    return cmd + ["-m", "zhtune", command, *rest]


def maybe_relaunch(command: str, argv: list[str]) -> tuple[int | None, list[str]]:
    """(exit code of a torchrun re-launch or None to run here, the arguments left for this process)."""
    launch, rest = split_launch_args(argv)
    if not launch:
        return None, argv
    if under_launcher():
        log.info(
            "already started by a launcher (WORLD_SIZE=%s): ignoring %s", os.environ["WORLD_SIZE"], launch
        )
        return None, rest
    if launch.get("nproc_per_node", "1") == "1" and launch.get("nnodes", "1") == "1":
        return None, rest
    if "-h" in rest or "--help" in rest:
        return None, rest
    cmd = torchrun_command(command, launch, rest)
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd), rest


def main_process_first():
    """Context: in a distributed run the main process goes first (tokenizing, filling caches), the others
    wait for it; in one process, nothing."""
    import contextlib

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()
