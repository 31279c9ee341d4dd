"""GPU health checks (group ``gpu``): NVML snapshot probes judged per GPU, and the kernel log's Xids.

All run in the shared NVML worker (``worker="nvml"``): NVML calls can hang on a GPU in a bad state,
and a timeout then kills that worker, not verify. All are ``needs_gpus``: the runner skips them on a
node expected to have none; the NVML ones also need ``gpu.driver`` (one root cause when it fails).
"""

from __future__ import annotations

from collections.abc import Callable

from checks.gpu import judges
from checks.gpu.commands import run_command
from checks.gpu.nvml import NodeSnapshot, load_nvml, probe_nvml
from checks.registry import Context, check
from checks.result import Status, Verdict

NVML_TIMEOUT_S = 60
NEEDS = ("gpu.driver",)  # without a loaded driver every NVML check fails the same way: one root cause


def snapshot_or_verdict(ctx: Context) -> NodeSnapshot | Verdict:
    """The NVML snapshot, or the verdict that explains why there is none. (A node expected to have no
    GPUs never gets here: these checks are ``needs_gpus``, and the runner skips them there.)"""
    expected = ctx.node.gpus
    try:
        nvml = load_nvml()
    except ImportError:
        return Verdict(Status.FAIL, "nvidia-ml-py (pynvml) is not installed, so NVML cannot be queried", {},
                       {"gpus": expected}, "pip install nvidia-ml-py in the stack's virtualenv (venv role).")
    snap = probe_nvml(nvml)
    if snap.error:
        return Verdict(Status.FAIL, f"NVIDIA driver not loaded ({snap.error}); this node is expected to have "
                                    f"{expected} GPU(s)", {}, {"gpus": expected},
                       "Install and load the stack's driver (nvidia_driver role); see the gpu.driver check.")
    if not snap.gpus:
        return Verdict(Status.FAIL, f"NVML sees no GPU; this node is expected to have {expected}", {"gpus": 0},
                       {"gpus": expected}, "Check `lspci | grep -i nvidia` and the kernel log for Xid 79.")
    return snap


def per_gpu(ctx: Context, judge: Callable) -> list[Verdict] | Verdict:
    snap = snapshot_or_verdict(ctx)
    if isinstance(snap, Verdict):
        return snap
    return [judge(g) for g in snap.gpus]


@check("gpu.inventory", "GPU count and model as expected; one VBIOS per model",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_inventory(ctx: Context):
    snap = snapshot_or_verdict(ctx)
    if isinstance(snap, Verdict):
        return snap
    return judges.judge_inventory(snap, ctx.node.gpus, ctx.node.gpu_model)


@check("gpu.ecc", "ECC enabled, no uncorrectable errors",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_ecc(ctx: Context):
    return per_gpu(ctx, judges.judge_ecc)


@check("gpu.memory_errors", "No pending or failed row remaps or page retirements",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_memory_errors(ctx: Context):
    return per_gpu(ctx, judges.judge_memory_errors)


@check("gpu.throttle", "No hardware slowdown; temperature below slowdown",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_throttle(ctx: Context):
    return per_gpu(ctx, judges.judge_throttle)


@check("gpu.pcie", "PCIe link at full width (and speed under load)",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_pcie(ctx: Context):
    return per_gpu(ctx, judges.judge_pcie)


@check("gpu.settings", "Persistence mode on; MIG mode as expected",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_settings(ctx: Context):
    return per_gpu(ctx, lambda g: judges.judge_settings(g, ctx.node.mig))


@check("gpu.nvlink", "Every NVLink link active",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_nvlink(ctx: Context):
    return per_gpu(ctx, judges.judge_nvlink)


@check("gpu.processes", "No leftover processes or memory on the GPUs",
       worker="nvml", needs=NEEDS, needs_gpus=True, timeout_s=NVML_TIMEOUT_S)
def gpu_processes(ctx: Context):
    return per_gpu(ctx, judges.judge_processes)


# Kernel log since boot: the journal when there is one (complete since boot), else the ring buffer.
KERNEL_LOG_COMMANDS = (
    ("journalctl -k -b", ["journalctl", "-k", "-b", "--no-pager", "-q", "-o", "short"]),
    ("dmesg", ["dmesg"]),
)


def probe_kernel_log(timeout_s: float = 20) -> tuple[str | None, str]:
    """(log text, source) or (None, why not)."""
    problems = []
    for name, argv in KERNEL_LOG_COMMANDS:
        done = run_command(argv, timeout_s)
        if done.problem() is None:
            return done.output, name
        problems.append(f"{name}: {done.problem()}")
    return None, "; ".join(problems)


@check("gpu.xid", "No Xid in the kernel log since boot that NVIDIA's Xid catalog says needs a GPU reset, a reboot "
                  "or support (application-level and unknown Xids warn)", worker="nvml", needs_gpus=True,
       timeout_s=NVML_TIMEOUT_S)
def gpu_xid(ctx: Context):
    """One result per GPU (its Xids with count and first/last time stamp, and its identity), plus one per
    other PCI address that logged an Xid. NVML only names the GPUs: without it the Xids are still judged,
    per PCI address."""
    text, source = probe_kernel_log()
    if text is None:
        return Verdict(Status.WARN, f"cannot read the kernel log ({source})", {}, {},
                       "Run verify as root (or with CAP_SYSLOG) so Xid errors can be seen.")
    snap = None
    try:
        snap = probe_nvml(load_nvml())
    except ImportError:
        pass
    return judges.judge_xids(judges.parse_xids(text), snap.gpus if snap else [], source)
