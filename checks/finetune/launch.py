"""Start rank processes with torchrun, wait with a deadline, and collect what each rank reported.

``python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE RUN_DIR`` runs MODULE's
``main`` once per rank. Every rank writes ``rank<N>.json`` in RUN_DIR at each stage it reaches (see
:class:`checks.finetune.ranks.Status`), so a run that is killed still says where each rank was.

torchrun starts and ends through :mod:`checks.proc`: at the deadline (or on any exception here,
Ctrl-C included) the whole tree is killed, the ranks too, although torchrun puts each in a session of
its own (they carry the tree's token). Every rank also asks the kernel for SIGKILL when its parent
(torchrun) dies, and torchrun when the launcher dies, so nothing outlives a launcher that was itself
killed. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from checks import proc

LOG_TAIL_BYTES = 16384  # torchrun's failure summary comes after every failed rank's traceback

# Runs torchrun after asking the kernel to kill it when the launcher dies (the request survives exec).
_SHIM = ("import ctypes, os, sys\n"
         "try:\n"
         "    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL\n"
         "except Exception:\n"
         "    pass\n"
         "os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', *sys.argv[1:]])\n")


@dataclass
class Launch:
    """What came back from one torchrun run: how torchrun ended and each rank's last status."""

    module: str
    nproc: int
    exit: proc.Exit  # torchrun's; its tail is the end of torchrun's log (LOG_TAIL_BYTES)
    timeout_s: float = 0.0
    ranks: dict[int, dict] = field(default_factory=dict)  # rank -> its last status (missing: never wrote one)

    @property
    def timed_out(self) -> bool:
        return self.exit.timed_out

    @property
    def wall_s(self) -> float:
        return self.exit.elapsed_s

    @property
    def log_tail(self) -> str:
        return self.exit.tail

    def missing(self) -> list[int]:
        return [r for r in range(self.nproc) if r not in self.ranks]


def torchrun_command(module: str, nproc: int, run_dir: str) -> list[str]:
    return proc.python_argv("-c", _SHIM, "--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0",
                            f"--log_dir={os.path.join(run_dir, 'torchelastic')}", "-m", module, run_dir)


def rank_env(extra: dict[str, str] | None = None, allow_download: bool = False) -> dict[str, str]:
    """:func:`checks.proc.child_env` plus what ranks want unless the operator set it: one OpenMP thread
    per rank (torchrun's own default for several ranks, without its warning), and NCCL collectives
    that raise at their timeout instead of hanging."""
    defaults = {"OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    mine = {k: os.environ.get(k, v) for k, v in defaults.items()}
    return proc.child_env(mine | (extra or {}), allow_download=allow_download)


def run_torchrun(module: str, nproc: int, config: dict, *, timeout_s: float, env: dict[str, str] | None = None,
                 allow_download: bool = False) -> Launch:
    """Run ``module`` on ``nproc`` ranks with ``config`` (JSON, read by every rank from RUN_DIR/config.json)."""
    run_dir = tempfile.mkdtemp(prefix="peftnode-torchrun-")
    try:
        Path(run_dir, "config.json").write_text(json.dumps(config))
        ended = proc.run(torchrun_command(module, nproc, run_dir), timeout_s=timeout_s,
                         env=rank_env(env, allow_download), log_path=Path(run_dir, "torchrun.log"), keep_output=True)
        ended.tail = ended.output[-LOG_TAIL_BYTES:]
        return Launch(module, nproc, ended, timeout_s=timeout_s, ranks=read_ranks(run_dir, nproc))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def read_ranks(run_dir: str, nproc: int) -> dict[int, dict]:
    out = {}
    for rank in range(nproc):
        try:
            out[rank] = json.loads(Path(run_dir, f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            pass
    return out
