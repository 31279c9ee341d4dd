"""``cuda.torch``: torch's view of the stack. The CUDA, cuDNN and NCCL it was built with and carries,
the GPUs it sees (against the node's expectation and NVML's count), and a small fp32 matmul on every
GPU checked against the CPU.

It runs in the shared torch worker (``worker="torch"``), where torch is imported and CUDA initialised
once per run, and only where GPUs are expected and the driver loaded (``needs_gpus``, ``needs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from packaging.requirements import Requirement

from checks.cuda.versions import decode_cudnn, decode_nccl, fmt, parse_version, same
from checks.registry import Context, check
from checks.result import GpuId, Status, Value, Verdict

MATMUL_N = 256
MATMUL_TOL = 1e-4  # rtol and atol; fp32 with TF32 off agrees with the CPU to ~1e-6 at this size


@dataclass
class GpuCompute:
    index: int
    name: str | None
    max_abs_err: float | None  # |GPU - CPU| of the fixed-seed matmul
    allclose: bool
    error: str | None = None
    gpu: GpuId | None = None


@dataclass
class TorchProbe:
    torch_version: str | None
    import_error: str | None = None
    cuda: str | None = None  # torch.version.cuda; None for a CPU-only build
    cudnn_code: int | None = None  # torch.backends.cudnn.version()
    cuda_available: bool = False
    cuda_error: str | None = None  # why CUDA is not available, when torch says
    device_count: int | None = None
    nccl: str | None = None  # torch.cuda.nccl.version(), "2.14.3"
    nvml_count: int | None = None
    nvml_error: str | None = None
    compute: list[GpuCompute] = field(default_factory=list)


def _nvml_count() -> tuple[int | None, str | None]:
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"NVML did not initialise: {exc}"
    try:
        return int(pynvml.nvmlDeviceGetCount()), None
    finally:
        pynvml.nvmlShutdown()


def _nccl_text(raw) -> str | None:
    """torch.cuda.nccl.version(): a tuple (2, 14, 3[, suffix]) in current torch, an int in old ones."""
    if isinstance(raw, int):
        return fmt(decode_nccl(raw))
    if isinstance(raw, (tuple, list)) and len(raw) >= 3:
        return fmt(tuple(int(p) for p in raw[:3]))
    return None


def probe_torch(matmul: bool = True) -> TorchProbe:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install raising OSError on a missing .so
        return TorchProbe(None, f"{type(exc).__name__}: {exc}")
    probe = TorchProbe(str(torch.__version__), cuda=torch.version.cuda)
    try:
        probe.cudnn_code = torch.backends.cudnn.version()
    except Exception:  # a CUDA build whose cuDNN cannot be loaded: judged as "no cuDNN"
        probe.cudnn_code = None
    if probe.cuda is None:
        return probe
    probe.nvml_count, probe.nvml_error = _nvml_count()
    try:
        torch.cuda.init()
        probe.cuda_available = torch.cuda.is_available()
    except Exception as exc:
        probe.cuda_error = f"{type(exc).__name__}: {exc}".strip()
    if not probe.cuda_available:
        probe.cuda_error = probe.cuda_error or "torch.cuda.is_available() is False"
        return probe
    probe.device_count = torch.cuda.device_count()
    try:
        probe.nccl = _nccl_text(torch.cuda.nccl.version())
    except Exception:  # a torch built without NCCL: judged as "no NCCL"
        probe.nccl = None
    if matmul:
        probe.compute = _matmul_every_gpu(torch, probe.device_count)
    return probe


def _matmul_every_gpu(torch, count: int) -> list[GpuCompute]:
    gen = torch.Generator().manual_seed(1234)
    a = torch.rand(MATMUL_N, MATMUL_N, generator=gen, dtype=torch.float32) * 2 - 1
    b = torch.rand(MATMUL_N, MATMUL_N, generator=gen, dtype=torch.float32) * 2 - 1
    reference = a @ b
    from checks.perf import torch_gpu_id

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    out = []
    try:
        for i in range(count):
            name = None
            try:
                name = torch.cuda.get_device_name(i)
                dev = torch.device("cuda", i)
                got = (a.to(dev) @ b.to(dev)).cpu()
                torch.cuda.synchronize(dev)
                err = float((got - reference).abs().max())
                ok = bool(torch.allclose(got, reference, rtol=MATMUL_TOL, atol=MATMUL_TOL))
                out.append(GpuCompute(i, name, err, ok, gpu=torch_gpu_id(i)))
            except Exception as exc:  # an ECC error, a lost GPU, an unsupported arch
                out.append(GpuCompute(i, name, None, False, f"{type(exc).__name__}: {exc}".strip(), torch_gpu_id(i)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return out


def judge_torch_view(probe: TorchProbe, cuda_version: str, cudnn_version: str, nccl_version: str,
                     expected_gpus: int, torch_requirement: str | None = None) -> list[Verdict]:
    expected = {"cuda": fmt(parse_version(cuda_version)[:2]), "cudnn": cudnn_version, "nccl": nccl_version,
                "gpus": expected_gpus}
    install = (f"Install the stack's torch ({torch_requirement or 'venv.requirements'}) with the venv role; a "
               "+cuXYZ build comes from the PyTorch index for that CUDA (venv.extra_index_url).")
    if probe.torch_version is None:
        return [Verdict(Status.FAIL, f"torch cannot be imported: {probe.import_error}", {}, expected, install)]
    measured: dict[str, Value] = {"torch": Value(probe.torch_version), "cuda": Value(probe.cuda or "none (CPU-only)")}
    if probe.cuda is None:
        return [Verdict(Status.FAIL, f"CPU-only torch build ({probe.torch_version}) on a node expected to have "
                                     f"{expected_gpus} GPU(s)", measured, expected, install)]

    verdicts = []
    # The build: what torch was compiled against and carries.
    want_cuda, want_cudnn, want_nccl = (parse_version(v) for v in (cuda_version, cudnn_version, nccl_version))
    cudnn = decode_cudnn(probe.cudnn_code) if probe.cudnn_code else None
    if cudnn:
        measured["cudnn"] = Value(fmt(cudnn))
    if probe.nccl:
        measured["nccl"] = Value(probe.nccl)
    fails, warns = [], []
    if not same(parse_version(probe.cuda), want_cuda, 2):
        fails.append(f"torch is built for CUDA {probe.cuda}, the stack's CUDA is {fmt(want_cuda[:2])}")
    if cudnn is None:
        warns.append("torch reports no cuDNN (torch.backends.cudnn.version() is None)")
    elif not same(cudnn, want_cudnn, 3):
        warns.append(f"torch uses its own cuDNN {fmt(cudnn)}, not the stack's {fmt(want_cudnn[:3])} (torch wheels "
                     "carry their cuDNN; the system copy serves other programs)")
    if probe.cuda_available:
        if probe.nccl is None:
            (fails if expected_gpus > 1 else warns).append("torch has no NCCL (multi-GPU training needs it)")
        elif not same(parse_version(probe.nccl), want_nccl, 3):
            fails.append(f"torch's NCCL is {probe.nccl}, the stack pins {nccl_version} (every node of a job must "
                         "run the same NCCL)")
    summary = f"torch {probe.torch_version}: CUDA {probe.cuda}, cuDNN {fmt(cudnn) or '-'}, NCCL {probe.nccl or '-'}"
    if fails:
        verdicts.append(Verdict(Status.FAIL, "; ".join(fails + warns), measured, expected, install, subject="build"))
    elif warns:
        verdicts.append(Verdict(Status.WARN, f"{summary}: " + "; ".join(warns), measured, expected, install,
                                subject="build"))
    else:
        verdicts.append(Verdict(Status.PASS, summary, measured, expected, subject="build"))

    # The devices torch sees.
    dev_measured: dict[str, Value] = {"device_count": Value(probe.device_count)}
    if probe.nvml_count is not None:
        dev_measured["nvml_count"] = Value(probe.nvml_count)
    dev_expected = {"gpus": expected_gpus}
    if not probe.cuda_available:
        verdicts.append(Verdict(Status.FAIL, f"torch cannot use CUDA: {probe.cuda_error}", dev_measured,
                                dev_expected, "Check the driver (gpu.driver), that the driver supports CUDA "
                                              f"{probe.cuda}, and CUDA_VISIBLE_DEVICES.", subject="devices"))
        return verdicts
    problems = []
    if probe.device_count != expected_gpus:
        problems.append(f"torch sees {probe.device_count} GPU(s), the node is expected to have {expected_gpus}")
    if probe.nvml_count is not None and probe.nvml_count != probe.device_count:
        problems.append(f"NVML counts {probe.nvml_count} GPU(s) but torch sees {probe.device_count} (check "
                        "CUDA_VISIBLE_DEVICES and MIG mode)")
    if problems:
        verdicts.append(Verdict(Status.FAIL, "; ".join(problems), dev_measured, dev_expected,
                                "Unset or fix CUDA_VISIBLE_DEVICES; a GPU missing from NVML too has fallen off "
                                "the bus or lost its driver (see gpu.driver and the kernel log).",
                                subject="devices"))
    else:
        verdicts.append(Verdict(Status.PASS, f"torch sees {probe.device_count} GPU(s)", dev_measured, dev_expected,
                                subject="devices"))

    # A small computation on every GPU, checked against the CPU.
    for gpu in probe.compute:
        g_measured = {"name": Value(gpu.name)} if gpu.name else {}
        g_expected = {"max_abs_err": Value(MATMUL_TOL)}
        if gpu.max_abs_err is not None:
            g_measured["max_abs_err"] = Value(gpu.max_abs_err)
        subject = f"gpu{gpu.index}"
        gid = gpu.gpu or GpuId(gpu.index)
        fix = ("Run the GPU's diagnostics (dcgmi diag -r 2), look for XID errors in the kernel log; drain the node "
               "if it repeats.")
        if gpu.error:
            verdicts.append(Verdict(Status.FAIL, f"a {MATMUL_N}x{MATMUL_N} fp32 matmul failed on GPU {gpu.index}: "
                                                 f"{gpu.error}", g_measured, g_expected, fix, subject=subject, gpu=gid))
        elif not gpu.allclose:
            verdicts.append(Verdict(Status.FAIL, f"a {MATMUL_N}x{MATMUL_N} fp32 matmul on GPU {gpu.index} differs "
                                                 f"from the CPU by up to {gpu.max_abs_err:.3g} (tolerance "
                                                 f"{MATMUL_TOL:g})", g_measured, g_expected, fix, subject, gid))
        else:
            verdicts.append(Verdict(Status.PASS, f"{MATMUL_N}x{MATMUL_N} fp32 matmul on GPU {gpu.index} "
                                                 f"({gpu.name}) matches the CPU (max |diff| {gpu.max_abs_err:.2g})",
                                    g_measured, g_expected, subject=subject, gpu=gid))
    return verdicts


def _torch_requirement(stack: dict) -> str | None:
    for text in stack.get("venv", {}).get("requirements", []):
        if Requirement(text).name == "torch":
            return text
    return None


@check("cuda.torch", "torch sees the stack's CUDA, cuDNN, NCCL and every GPU, and computes right on each",
       worker="torch", exclusive=True, needs=("gpu.driver",), needs_gpus=True, timeout_s=120)
def cuda_torch(ctx: Context) -> list[Verdict]:
    return judge_torch_view(probe_torch(), ctx.stack["cuda"]["version"], ctx.stack["cudnn"]["version"],
                            ctx.stack["nccl"]["version"], ctx.node.gpus, _torch_requirement(ctx.stack))
