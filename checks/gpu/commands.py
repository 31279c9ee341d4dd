"""The commands the GPU checks run (journalctl/dmesg, systemctl, nv-fabricmanager, nvidia-smi, dcgmi).

They start through the process layer (checks/proc.py): a deadline, and the whole tree killed past it
or when the check is interrupted. What comes back is the command's whole output (stdout and stderr
as it wrote them: ``keep_output``), not only the tail ``proc.Exit`` keeps: a kernel log or a DCGM
report is longer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from checks import proc


@dataclass
class Command:
    argv: list[str]
    exit: proc.Exit | None  # None: it did not start (see ``error``)
    output: str = ""
    error: str | None = None  # why it did not start: "not installed", the OSError
    timeout_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit is not None and self.exit.ok

    def problem(self) -> str | None:
        """Why it gave nothing usable, in a few words; None when it exited 0 with output."""
        if self.exit is None:
            return self.error
        if not self.exit.ok:
            if self.exit.timed_out or self.exit.signal:
                return self.exit.describe(self.timeout_s)
            return self.exit.last_line() or self.exit.describe(self.timeout_s)
        return None if self.output.strip() else "no output"


def run_command(argv: list[str], timeout_s: float) -> Command:
    """Run ``argv`` to its end or ``timeout_s``; never raises."""
    if shutil.which(argv[0]) is None:
        return Command(list(argv), None, error="not installed", timeout_s=timeout_s)
    try:
        done = proc.run(list(argv), timeout_s=timeout_s, keep_output=True)
    except OSError as exc:  # not executable, a wrong architecture
        return Command(list(argv), None, error=str(exc), timeout_s=timeout_s)
    return Command(list(argv), done, done.output, timeout_s=timeout_s)
