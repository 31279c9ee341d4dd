"""NCCL all-reduce across the node's GPUs: torch.distributed (always) and nccl-tests (when installed).

``nccl.allreduce`` returns two verdicts from one call. ``torch`` (:mod:`checks.nccl.allreduce`): the
check runs as a launcher in the run's shared torch worker and starts one rank process per visible GPU
through :mod:`checks.proc`; the ranks check the reduced values and measure one large all-reduce the way
nccl-tests does (``busbw = algbw x 2(n-1)/n``). One size, not a sweep: nccl-tests' "Avg bus bandwidth"
averages every size of a sweep and reads far below the large-message figure. ``nccl-tests``
(:mod:`checks.nccl.nccltests`): ``all_reduce_perf`` at the same size and rank count when it is on PATH
or where the nccl_tests role installs it (:data:`NCCL_TESTS_DIRS`; a skip when neither), judged with
the torch busbw of the same call beside its own. A node expected to have no GPUs never gets here (the
runner skips ``needs_gpus`` checks); one GPU, or fewer than 2 CUDA devices, is one verdict. Without
CUDA but with ``all_reduce_perf`` installed, all_reduce_perf runs anyway to say what is wrong in its
own words.

Defaults: 1 GiB full (node.perf.allreduce_bytes overrides), 256 MiB with ``--quick`` (at most
node.perf.allreduce_bytes). 256 MiB reads ~10 % under 1 GiB on NVSwitch nodes (the shared H100
sample: 434 vs 470 GB/s), inside the 0.8 floor. Timing: warm-up 3 (quick) / 5 all-reduces, then the
median of 3 / 5 batches of 5 / 20; the time of an all-reduce is the slowest rank's.

Time on an 8-GPU node with ``--quick``: the launcher costs nothing of its own (torch is already imported
in the shared worker); 8 rank processes import torch side by side ~3-5 s, NCCL communicator set-up
2-10 s, 1 + 3 + 15 + 1 all-reduces of 256 MiB at 2-4 ms ~0.1 s: ~10-15 s; nccl-tests at one size ~5 s
more. With perf's ~3 s of quick measuring the quick perf + nccl groups take ~20 s. Full: 1 GiB,
1 + 5 + 100 + 1 all-reduces at 5-9 ms ~1 s more.
"""

from __future__ import annotations

import shutil

from checks.nccl.allreduce import (
    CHECK_TIMEOUT_S,
    DEADLINE_S,
    AllreduceProbe,
    algbw_gbps,
    allreduce_busbw,
    expected_busbw,
    expected_sum,
    judge_allreduce,
    measurement_bytes,
    probe_allreduce,
    torch_busbw,
)
from checks.nccl.nccltests import (
    NcclTestsReport,
    NcclTestsRow,
    judge_nccl_tests,
    nccl_tests_verdict,
    parse_nccl_tests,
    run_all_reduce_perf,
)
from checks.registry import Context, check
from checks.result import Status, Verdict
from checks.timing import cuda_status, judge_no_cuda

__all__ = [
    "CHECK_TIMEOUT_S", "DEADLINE_S", "NCCL_TESTS_DIRS", "NO_NCCL_TESTS", "AllreduceProbe", "NcclTestsReport",
    "NcclTestsRow", "algbw_gbps", "allreduce_busbw", "cuda_status", "expected_busbw", "expected_sum",
    "find_all_reduce_perf", "judge_allreduce", "judge_nccl_tests", "measurement_bytes", "nccl_allreduce",
    "parse_nccl_tests", "probe_allreduce", "run_all_reduce_perf", "torch_busbw",
]

# Where the nccl_tests role installs nccl-tests: a stable link to /usr/local/nccl-tests-<version>
# (roles/peftnode_nccl_tests, peftnode_nccl_tests_link). Looked in after PATH.
NCCL_TESTS_DIRS: tuple[str, ...] = ("/usr/local/nccl-tests/bin",)

NO_NCCL_TESTS = "all_reduce_perf (NVIDIA nccl-tests) is not on PATH; the torch figure stands alone"


def find_all_reduce_perf(dirs: tuple[str, ...] | None = None) -> str | None:
    """``all_reduce_perf`` on PATH, else in the nccl_tests role's directories (NCCL_TESTS_DIRS)."""
    found = shutil.which("all_reduce_perf")
    for directory in (NCCL_TESTS_DIRS if dirs is None else dirs):
        if found:
            break
        found = shutil.which("all_reduce_perf", path=directory)
    return found


@check("nccl.allreduce", "NCCL all-reduce across the node's GPUs: torch.distributed (right sums, bus bandwidth) "
                         "and nccl-tests all_reduce_perf beside it when installed",
       worker="torch", exclusive=True, needs=("gpu.driver", "cuda.torch"),
       needs_gpus=True, timeout_s=CHECK_TIMEOUT_S)
def nccl_allreduce(ctx: Context) -> Verdict | list[Verdict]:
    what = "the NCCL all-reduce"
    node = ctx.node
    if node.gpus == 1:
        return Verdict(Status.SKIP, f"{what}: this node is expected to have 1 GPU and an all-reduce needs at "
                                    "least 2", {}, {"gpus": 1})
    binary = find_all_reduce_perf()
    nbytes = measurement_bytes(node.perf, ctx.quick)
    usable, count, reason = cuda_status()
    if not usable:
        no_cuda = judge_no_cuda(reason, node.gpus, what)
        if binary is None:
            return no_cuda
        no_cuda.subject = "torch"  # all_reduce_perf on the expected GPUs says what is wrong in its own words
        return [no_cuda, nccl_tests_verdict(binary, node.gpus, nbytes, ctx.quick, node, None, DEADLINE_S)]
    if count < 2:
        return Verdict(Status.FAIL, f"only {count} CUDA device visible to torch; this node is expected to have "
                                    f"{node.gpus}, and an all-reduce needs at least 2", {"cuda_devices": count},
                       {"gpus": node.gpus},
                       "See the GPU inventory checks; check CUDA_VISIBLE_DEVICES and `nvidia-smi -L`.")
    timing = {"warmup": 3, "repeats": 3, "iters": 5} if ctx.quick else {"warmup": 5, "repeats": 5, "iters": 20}
    probe = probe_allreduce(count, nbytes, **timing)
    if probe.device is None and node.gpu_model:
        probe.device = node.gpu_model
    torch_verdict = judge_allreduce(probe, node.perf)
    torch_verdict.subject = "torch"
    if binary is None:
        tests = Verdict(Status.SKIP, NO_NCCL_TESTS, {}, {}, subject="nccl-tests")
    else:
        tests = nccl_tests_verdict(binary, count, nbytes, ctx.quick, node, torch_busbw(probe), DEADLINE_S)
    return [torch_verdict, tests]
