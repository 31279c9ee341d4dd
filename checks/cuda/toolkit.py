"""``cuda.toolkit``: the CUDA toolkit is where the cuda role puts it, and is the stack's version.

Every source of the version a toolkit carries is read (version.json, version.txt before 11.1, the
runtime header, ``nvcc --version`` or ``ptxas --version``) and all must agree with the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from checks import proc
from checks.cuda.prefixes import cuda_home_candidates, lib_dirs, read_text
from checks.cuda.versions import (
    Release,
    fmt,
    parse_compiler_version,
    parse_cuda_runtime_header,
    parse_version,
    parse_version_json,
    parse_version_txt,
    same,
)
from checks.registry import Context, check
from checks.result import Status, Value, Verdict

VERSION_TIMEOUT_S = 30.0  # `nvcc --version` answers in well under a second


@dataclass
class ToolkitProbe:
    tried: list[str]  # prefixes looked at, in order
    prefix: str | None  # the first that exists (resolved symlink in prefix_real)
    prefix_real: str | None = None
    version_json: dict[str, str] = field(default_factory=dict)  # component -> version, from version.json
    version_txt: str | None = None  # toolkits before 11.1
    header_version: str | None = None  # from include/cuda_runtime_api.h, "11.7"
    compiler_tool: str | None = None  # "nvcc" or "ptxas": the one that answered
    compiler_version: str | None = None  # "11.7.99"
    compiler_error: str | None = None  # why no compiler version was read
    cudart_libs: list[str] = field(default_factory=list)  # lib64/libcudart.so.* found


def run_version(tool: Path, timeout_s: float = VERSION_TIMEOUT_S) -> tuple[str | None, str | None]:
    """(output, error) of ``tool --version``, run with a deadline through the process layer."""
    try:
        done = proc.run([str(tool), "--version"], timeout_s=timeout_s)
    except OSError as exc:  # not executable, a wrong architecture
        return None, f"{tool} --version: {exc}"
    if not done.ok:
        return None, f"{tool} --version {done.describe(timeout_s)}: {done.last_line() or 'no output'}"
    return done.tail, None


def probe_cuda_toolkit(candidates: list[str], timeout_s: float = VERSION_TIMEOUT_S) -> ToolkitProbe:
    prefix = next((c for c in candidates if Path(c).is_dir()), None)
    probe = ToolkitProbe(list(candidates), prefix)
    if prefix is None:
        return probe
    root = Path(prefix)
    probe.prefix_real = str(root.resolve())
    text = read_text(root / "version.json")
    if text is not None:
        probe.version_json = parse_version_json(text)
    text = read_text(root / "version.txt")
    if text is not None:
        probe.version_txt = fmt(parse_version_txt(text))
    text = read_text(root / "include" / "cuda_runtime_api.h")
    if text is not None:
        probe.header_version = fmt(parse_cuda_runtime_header(text))
    for d in lib_dirs(prefix):
        probe.cudart_libs += sorted(str(p) for p in d.glob("libcudart.so.*"))
    errors = []
    for tool in ("nvcc", "ptxas"):
        path = root / "bin" / tool
        if not path.exists():
            errors.append(f"no bin/{tool}")
            continue
        out, err = run_version(path, timeout_s)
        version = parse_compiler_version(out) if out else None
        if version is not None:
            probe.compiler_tool, probe.compiler_version = tool, fmt(version)
            break
        errors.append(err or f"bin/{tool} --version printed no release line")
    if errors:  # all of them when no compiler answered; else e.g. "no bin/nvcc" when ptxas did
        probe.compiler_error = "; ".join(errors)
    return probe

def judge_cuda_toolkit(probe: ToolkitProbe, stack_version: str) -> Verdict:
    want = parse_version(stack_version)
    expected = {"cuda": stack_version}
    role_fix = (f"Install CUDA {stack_version} (cuda role: the runfile with --silent --toolkit "
                f"--toolkitpath=/usr/local/cuda-{fmt(want[:2])}, or NVIDIA's redistributable archives), "
                "or set node.cuda_home in the node manifest to where it is installed.")
    if probe.prefix is None:
        return Verdict(Status.FAIL, f"no CUDA toolkit: none of {', '.join(probe.tried)} exists", {}, expected,
                       role_fix)
    where = probe.prefix if probe.prefix_real in (None, probe.prefix) else f"{probe.prefix} -> {probe.prefix_real}"
    measured: dict[str, Value] = {"prefix": Value(where)}
    # (label, version, how many components this source can be compared on)
    runtime: list[tuple[str, Release, int]] = []
    sdk = parse_version(probe.version_json.get("cuda"))
    if sdk:
        runtime.append(("version.json cuda", sdk, 3))
    cudart = parse_version(probe.version_json.get("cuda_cudart"))
    if cudart:
        runtime.append(("version.json cuda_cudart", cudart, 2))
    if probe.version_txt:
        runtime.append(("version.txt", parse_version(probe.version_txt), 2))
    if probe.header_version:
        runtime.append(("include/cuda_runtime_api.h", parse_version(probe.header_version), 2))
    if not runtime:
        return Verdict(Status.FAIL, f"{where} exists but holds no version.json, version.txt or "
                                    "include/cuda_runtime_api.h: not a CUDA toolkit, or an incomplete one",
                       measured, expected, role_fix)
    label, version, _ = runtime[0]
    measured["runtime"] = Value(fmt(version))
    measured["runtime_source"] = Value(label)
    if probe.compiler_version:
        measured["compiler"] = Value(probe.compiler_version)
        measured["compiler_tool"] = Value(probe.compiler_tool)

    problems = [f"{lbl} says {fmt(v)}" for lbl, v, _ in runtime if not same(v, want, 2)]
    compiler = parse_version(probe.compiler_version)
    if compiler and not same(compiler, want, 2):
        problems.append(f"bin/{probe.compiler_tool} is release {fmt(compiler[:2])} (V{probe.compiler_version})")
    if problems:
        return Verdict(Status.FAIL, f"CUDA at {where} is not {fmt(want[:2])}: " + "; ".join(problems),
                       measured, expected, role_fix)

    notes = [f"{lbl} says {fmt(v)}, the stack pins {stack_version}" for lbl, v, parts in runtime
             if parts == 3 and not same(v, want, 3)]
    if probe.compiler_version is None:
        notes.append(f"no compiler version ({probe.compiler_error}); DeepSpeed op builds and torch extensions "
                     "need nvcc")
    elif probe.compiler_tool != "nvcc":
        notes.append(f"bin/nvcc is absent (compiler release read from bin/{probe.compiler_tool}); DeepSpeed op "
                     "builds and torch extensions need nvcc")
    if not probe.cudart_libs:
        notes.append("no lib64/libcudart.so.* (the CUDA runtime library)")
    sources = ", ".join(lbl for lbl, _, _ in runtime)
    summary = f"CUDA {fmt(version)} at {where} (from {sources}"
    summary += f"; {probe.compiler_tool} V{probe.compiler_version})" if probe.compiler_version else ")"
    if notes:
        return Verdict(Status.WARN, summary + ": " + "; ".join(notes), measured, expected,
                       f"Install the complete toolkit {stack_version} (cuda role, --toolkit).")
    return Verdict(Status.PASS, summary, measured, expected)


@check("cuda.toolkit", "CUDA toolkit is installed and is the stack's version", timeout_s=60)
def cuda_toolkit(ctx: Context) -> Verdict:
    version = ctx.stack["cuda"]["version"]
    return judge_cuda_toolkit(probe_cuda_toolkit(cuda_home_candidates(ctx.node, version)), version)
