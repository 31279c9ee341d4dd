"""The CUDA toolkit, NCCL and cuDNN where the roles install them, and torch's view of all three.

The library checks read versions the way a program would: they load the real shared library with
ctypes and call its own version function (``ncclGetVersion``, ``cudnnGetVersion``), which needs
neither a GPU nor a driver. Headers are read too, so a header and a library from different installs
are caught. Loading a library runs its initialisers, and a broken one can crash the process, so
those checks run isolated in a worker process; so does the torch view, where CUDA initialisation
can hang.

As everywhere in ``checks``: thin probes return dataclasses, pure ``judge_*`` functions hold the
rules, and the version decoders are pure functions of the numbers the libraries return.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

from checks.registry import Context, check
from checks.result import Status, Value, Verdict

Version = tuple[int, ...]

# --- version numbers -----------------------------------------------------------------------------


def parse_version(text: str | None) -> Version | None:
    """'11.7.1' -> (11, 7, 1); None for anything that is not dotted digits."""
    if not text or not re.fullmatch(r"\d+(\.\d+)*", text.strip()):
        return None
    return tuple(int(p) for p in text.strip().split("."))


def fmt(version: Version | None) -> str | None:
    return ".".join(str(p) for p in version) if version is not None else None


def decode_cudart(code: int) -> Version:
    """CUDART_VERSION / cudaRuntimeGetVersion: major*1000 + minor*10 (11070 -> 11.7, 12040 -> 12.4)."""
    return (code // 1000, (code % 1000) // 10)


def decode_nccl(code: int) -> Version:
    """ncclGetVersion / NCCL_VERSION_CODE. NCCL >= 2.9 encodes major*10000 + minor*100 + patch
    (21403 -> 2.14.3); older releases major*1000 + minor*100 + patch (2708 -> 2.7.8)."""
    if code >= 10000:
        return (code // 10000, (code % 10000) // 100, code % 100)
    return (code // 1000, (code % 1000) // 100, code % 100)


def decode_cudnn(code: int) -> Version:
    """cudnnGetVersion / CUDNN_VERSION. cuDNN <= 8 encodes major*1000 + minor*100 + patch
    (8801 -> 8.8.1); cuDNN 9 major*10000 + minor*100 + patch (90100 -> 9.1.0)."""
    if code >= 10000:
        return (code // 10000, (code % 10000) // 100, code % 100)
    return (code // 1000, (code % 1000) // 100, code % 100)


def _defines(text: str) -> dict[str, int]:
    """Integer ``#define NAME 123`` lines of a C header."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\d+)\b", text, re.MULTILINE)}


def parse_cuda_runtime_header(text: str) -> Version | None:
    """``#define CUDART_VERSION 11070`` in include/cuda_runtime_api.h -> (11, 7)."""
    code = _defines(text).get("CUDART_VERSION")
    return decode_cudart(code) if code is not None else None


def parse_nccl_header(text: str) -> Version | None:
    """NCCL_MAJOR / NCCL_MINOR / NCCL_PATCH of include/nccl.h."""
    d = _defines(text)
    if {"NCCL_MAJOR", "NCCL_MINOR", "NCCL_PATCH"} <= d.keys():
        return (d["NCCL_MAJOR"], d["NCCL_MINOR"], d["NCCL_PATCH"])
    return None


def parse_cudnn_header(text: str) -> Version | None:
    """CUDNN_MAJOR / CUDNN_MINOR / CUDNN_PATCHLEVEL of include/cudnn_version.h (cudnn.h before cuDNN 8)."""
    d = _defines(text)
    if {"CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL"} <= d.keys():
        return (d["CUDNN_MAJOR"], d["CUDNN_MINOR"], d["CUDNN_PATCHLEVEL"])
    return None


def parse_version_json(text: str) -> dict[str, str]:
    """A toolkit's version.json: ``{"cuda": {"version": "11.7.1"}, "cuda_cudart": {...}, ...}`` ->
    component -> version string. Unreadable input gives an empty mapping."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: str(v["version"]) for k, v in data.items() if isinstance(v, dict) and "version" in v}


def parse_version_txt(text: str) -> Version | None:
    """Toolkits before 11.1 ship version.txt: 'CUDA Version 10.2.89'."""
    match = re.search(r"CUDA Version\s+(\d+(?:\.\d+)+)", text)
    return parse_version(match.group(1)) if match else None


def parse_compiler_version(text: str) -> Version | None:
    """``nvcc --version`` / ``ptxas --version``: 'Cuda compilation tools, release 11.7, V11.7.99'
    -> (11, 7, 99); the release alone when the V-number is missing."""
    match = re.search(r"release\s+(\d+)\.(\d+)(?:,\s*V(\d+)\.(\d+)\.(\d+))?", text)
    if not match:
        return None
    if match.group(3):
        return (int(match.group(3)), int(match.group(4)), int(match.group(5)))
    return (int(match.group(1)), int(match.group(2)))


def same(found: Version | None, expected: Version, parts: int) -> bool:
    return found is not None and found[:parts] == expected[:parts]


# --- where things are installed ------------------------------------------------------------------


def _home(node, key: str) -> str | None:
    """A prefix from the node expectations (a Node, or a plain mapping in the unit tests)."""
    return node.get(key) if isinstance(node, dict) else getattr(node, key)


def cuda_home_candidates(node: dict, cuda_version: str) -> list[str]:
    """node.cuda_home when the manifest sets it; else /usr/local/cuda-X.Y, then /usr/local/cuda."""
    if _home(node, "cuda_home"):
        return [str(_home(node, "cuda_home"))]
    major_minor = ".".join(cuda_version.split(".")[:2])
    return [f"/usr/local/cuda-{major_minor}", "/usr/local/cuda"]


def lib_dirs(home: str) -> list[Path]:
    return [Path(home, "lib64"), Path(home, "lib")]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def loaded_from(func) -> str | None:
    """The file a ctypes function was loaded from (dladdr), as the loader found it; None when it cannot tell."""
    for lib in (None, "libdl.so.2"):
        try:
            dladdr = ctypes.CDLL(lib).dladdr
        except (OSError, AttributeError):
            continue
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if dladdr(ctypes.cast(func, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
            return os.path.abspath(info.dli_fname.decode(errors="replace"))
    return None


def _first_existing(dirs: list[Path], names: list[str]) -> Path | None:
    for d in dirs:
        for name in names:
            if Path(d, name).exists():
                return Path(d, name)
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _header_near(library: str, home_includes: list[Path], name: str) -> Path | None:
    """The header that belongs to a library: <home>/include, else <libdir>/../include, else /usr/include."""
    lib_include = Path(library).resolve().parent.parent / "include"
    for d in [*home_includes, lib_include, Path("/usr/include")]:
        if Path(d, name).is_file():
            return Path(d, name)
    return None


# --- CUDA toolkit --------------------------------------------------------------------------------


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


def _run_version(tool: Path) -> tuple[str | None, str | None]:
    """(output, error) of ``tool --version``."""
    try:
        proc = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{tool} --version: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"{tool} --version exited {proc.returncode}: {tail[0]}"
    return proc.stdout, None


def probe_cuda_toolkit(candidates: list[str]) -> ToolkitProbe:
    prefix = next((c for c in candidates if Path(c).is_dir()), None)
    probe = ToolkitProbe(list(candidates), prefix)
    if prefix is None:
        return probe
    root = Path(prefix)
    probe.prefix_real = str(root.resolve())
    text = _read(root / "version.json")
    if text is not None:
        probe.version_json = parse_version_json(text)
    text = _read(root / "version.txt")
    if text is not None:
        probe.version_txt = fmt(parse_version_txt(text))
    text = _read(root / "include" / "cuda_runtime_api.h")
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
        out, err = _run_version(path)
        version = parse_compiler_version(out) if out else None
        if version is not None:
            probe.compiler_tool, probe.compiler_version = tool, fmt(version)
            break
        errors.append(err or f"bin/{tool} --version printed no release line")
    if probe.compiler_version is None:
        probe.compiler_error = "; ".join(errors)
    elif errors:
        probe.compiler_error = "; ".join(errors)  # e.g. "no bin/nvcc" when ptxas answered
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
    runtime: list[tuple[str, Version, int]] = []
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


# --- loading a library's version function --------------------------------------------------------


@dataclass
class LibProbe:
    """What loading one of NVIDIA's libraries told us. Shared by NCCL and cuDNN."""

    library: str | None = None  # the file loaded (or that failed to load), as the loader found it
    code: int | None = None  # the raw version number the library returned
    load_error: str | None = None  # why no version came back
    header: str | None = None  # the header read
    header_version: str | None = None  # "2.14.3"
    extra: dict = field(default_factory=dict)  # library_file (symlink resolved); cuDNN: cudart_code, sub-libraries
    dirs: list[str] = field(default_factory=list)  # directories looked in, in order
    names: list[str] = field(default_factory=list)  # file names looked for in each
    loader_names: list[str] = field(default_factory=list)  # then asked of the dynamic loader

    def tried(self) -> str:
        text = f"{', '.join(self.names)} in {', '.join(self.dirs)}" if self.dirs else "no directory"
        if self.loader_names:
            text += f", then the dynamic loader for {', '.join(self.loader_names)}"
        return text


Guard = Callable[[str], "str | None"]  # path of the loaded library -> why its version function must not be called


def _call_version(target: str, symbol: str, with_out_param: bool,
                  guard: Guard | None = None) -> tuple[str | None, int | None, str | None]:
    """Load ``target`` (a path or a soname) and call its version function: (path loaded, code, error).
    ``guard`` sees the path first and can refuse the call (cuDNN aborts the process when a sub-library
    its version function loads is missing)."""
    try:
        lib = ctypes.CDLL(target)
    except OSError as exc:
        absent = "/" not in target and "cannot open shared object file" in str(exc)
        return (None if absent else target), None, f"cannot load {target}: {exc}"
    try:
        func = getattr(lib, symbol)
    except AttributeError:
        return target, None, f"{target} has no {symbol}(): not the library it is named after"
    path = loaded_from(func) or target
    refused = guard(path) if guard else None
    if refused:
        return path, None, refused
    if with_out_param:  # ncclResult_t ncclGetVersion(int *version)
        func.argtypes = [ctypes.POINTER(ctypes.c_int)]
        func.restype = ctypes.c_int
        out = ctypes.c_int(-1)
        rc = func(ctypes.byref(out))
        if rc != 0:
            return path, None, f"{symbol}() returned error {rc}"
        return path, out.value, None
    func.argtypes = []  # size_t cudnnGetVersion(void)
    func.restype = ctypes.c_size_t
    return path, int(func()), None


def _probe_library(homes: list[str], names: list[str], loader_name: str, symbol: str, with_out_param: bool,
                   use_loader: bool, guard: Guard | None = None) -> LibProbe:
    dirs = [d for h in homes for d in lib_dirs(h)]
    probe = LibProbe(dirs=[str(d) for d in dirs], names=list(names))
    found = _first_existing(dirs, names)
    if found is not None:
        probe.library, probe.code, probe.load_error = _call_version(str(found.absolute()), symbol, with_out_param,
                                                                    guard)
    elif use_loader:
        for name in [*names, ctypes.util.find_library(loader_name)]:
            if not name or name in probe.loader_names:
                continue
            probe.loader_names.append(name)
            path, code, error = _call_version(name, symbol, with_out_param, guard)
            if path is not None or code is not None:  # found (loaded, or found but broken)
                probe.library, probe.code, probe.load_error = path, code, error
                break
    if probe.library is not None and os.path.realpath(probe.library) != probe.library:
        probe.extra["library_file"] = os.path.realpath(probe.library)
    return probe


def _read_header(probe: LibProbe, homes: list[str], name: str, parse) -> None:
    if probe.library is None:
        return
    header = _header_near(probe.library, [Path(h, "include") for h in homes], name)
    if header is not None:
        probe.header = str(header)
        probe.header_version = fmt(parse(_read(header) or ""))


# --- NCCL ----------------------------------------------------------------------------------------


def nccl_homes(node: dict, cuda_version: str, nccl_version: str | None = None) -> tuple[list[str], bool]:
    """Where to look for NCCL, and whether the dynamic loader may be asked after that:
    node.nccl_home alone when set; else the nccl role's versioned prefix /usr/local/nccl-<version>
    (unless node.cuda_home is set: NCCL copied into that toolkit, as the seed did), the CUDA prefix,
    then the loader."""
    if _home(node, "nccl_home"):
        return [str(_home(node, "nccl_home"))], False
    versioned = [f"/usr/local/nccl-{nccl_version}"] if nccl_version and not _home(node, "cuda_home") else []
    return versioned + cuda_home_candidates(node, cuda_version), True


def probe_nccl(homes: list[str], use_loader: bool = True) -> LibProbe:
    probe = _probe_library(homes, ["libnccl.so.2", "libnccl.so"], "nccl", "ncclGetVersion", True, use_loader)
    _read_header(probe, homes, "nccl.h", parse_nccl_header)
    return probe


def _library_verdict(what: str, probe: LibProbe, decoded: Version | None, want: Version, parts: int,
                     expected: dict, role_fix: str, note: str = "") -> Verdict:
    """The rules NCCL and cuDNN share: found, loaded, library == stack, header == library."""
    if probe.library is None:
        return Verdict(Status.FAIL, f"{what} not found (looked for {probe.tried()})", {}, expected, role_fix)
    measured: dict[str, Value] = {"library": Value(probe.library)}
    if probe.extra.get("library_file"):
        measured["library_file"] = Value(probe.extra["library_file"])
    if probe.load_error or decoded is None:
        return Verdict(Status.FAIL, f"{what} at {probe.library} is unusable: {probe.load_error}", measured,
                       expected, f"Reinstall {what} (the file is damaged or is not {what}); {role_fix}")
    measured["version"] = Value(fmt(decoded))
    measured["code"] = Value(probe.code)
    if probe.header:
        measured["header"] = Value(probe.header_version or "unreadable")
    if not same(decoded, want, parts):
        return Verdict(Status.FAIL, f"{what} {fmt(decoded)} is loaded from {probe.library}; the stack pins "
                                    f"{fmt(want)}{note}", measured, expected, role_fix)
    header = parse_version(probe.header_version)
    if probe.header and header != decoded[:3]:
        return Verdict(Status.FAIL, f"{what} library {probe.library} is {fmt(decoded)} but its header "
                                    f"{probe.header} says {probe.header_version or 'nothing readable'}: two "
                                    "installs are mixed", measured, expected,
                       f"Remove the stale copy; {role_fix}")
    header_note = f", header {probe.header}" if probe.header else ", no header found"
    return Verdict(Status.PASS, f"{what} {fmt(decoded)} loaded from {probe.library}{header_note}{note}",
                   measured, expected)


def judge_nccl(probe: LibProbe, stack_version: str) -> Verdict:
    want = parse_version(stack_version)
    role_fix = (f"Install NCCL {stack_version} (nccl role: nccl_{stack_version}-1+cudaX.Y_x86_64.txz into "
                f"/usr/local/nccl-{stack_version}, or the libnccl package), or set node.nccl_home to where it is.")
    decoded = decode_nccl(probe.code) if probe.code is not None else None
    return _library_verdict("NCCL", probe, decoded, want, 3, {"nccl": stack_version}, role_fix)


@check("cuda.nccl", "NCCL loads and is the stack's version", isolate=True, timeout_s=60)
def cuda_nccl(ctx: Context) -> Verdict:
    homes, use_loader = nccl_homes(ctx.node, ctx.stack["cuda"]["version"], ctx.stack["nccl"]["version"])
    return judge_nccl(probe_nccl(homes, use_loader), ctx.stack["nccl"]["version"])


# --- cuDNN ---------------------------------------------------------------------------------------

# What libcudnn.so dlopens on first use: present beside it, or the first convolution fails.
CUDNN_SUBLIBS = {
    8: ["ops_infer", "ops_train", "cnn_infer", "cnn_train", "adv_infer", "adv_train"],
    9: ["graph", "ops", "cnn", "adv", "engines_precompiled", "engines_runtime_compiled", "heuristic"],
}


def cudnn_homes(node: dict, cuda_version: str, cudnn_version: str | None = None) -> tuple[list[str], bool]:
    """As nccl_homes: node.cudnn_home alone when set; else /usr/local/cudnn-<version> (the cudnn role's
    prefix; not when node.cuda_home is set), the CUDA prefix, then the loader."""
    if _home(node, "cudnn_home"):
        return [str(_home(node, "cudnn_home"))], False
    versioned = [f"/usr/local/cudnn-{cudnn_version}"] if cudnn_version and not _home(node, "cuda_home") else []
    return versioned + cuda_home_candidates(node, cuda_version), True


def cudnn_names(stack_version: str) -> list[str]:
    """Sonames to try: the stack's major first, then the others."""
    major = stack_version.split(".")[0]
    return list(dict.fromkeys([f"libcudnn.so.{major}", "libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"]))


def soname_major(path: str) -> int | None:
    """8 for .../libcudnn.so.8 or a libcudnn.so that resolves to libcudnn.so.8.8.1; None when unversioned."""
    for name in (Path(path).name, Path(os.path.realpath(path)).name):
        match = re.search(r"\.so\.(\d+)", name)
        if match:
            return int(match.group(1))
    return None


def missing_cudnn_sublibs(library: str, major: int | None) -> list[str]:
    libdir = Path(library).parent
    return [f"libcudnn_{s}.so.{major}" for s in CUDNN_SUBLIBS.get(major, [])
            if not (libdir / f"libcudnn_{s}.so.{major}").exists()]


def _cudnn_guard(probe: LibProbe) -> Guard:
    def guard(path: str) -> str | None:
        missing = missing_cudnn_sublibs(path, soname_major(path))
        probe.extra["missing_sublibs"] = missing
        if missing:
            return (f"{', '.join(missing)} missing beside it, so cudnnGetVersion() was not called (it loads "
                    "them and aborts the process when one is absent)")
        return None

    return guard


def probe_cudnn(homes: list[str], stack_version: str, use_loader: bool = True) -> LibProbe:
    shared = LibProbe()  # collects what the guard saw
    probe = _probe_library(homes, cudnn_names(stack_version), "cudnn", "cudnnGetVersion", False, use_loader,
                           _cudnn_guard(shared))
    probe.extra.update(shared.extra)
    if probe.code is not None:
        try:  # the CUDA runtime cuDNN was built against (informational)
            func = ctypes.CDLL(probe.library).cudnnGetCudartVersion
            func.restype = ctypes.c_size_t
            probe.extra["cudart_code"] = int(func())
        except (OSError, AttributeError):
            pass
        major = decode_cudnn(probe.code)[0]
        if major != soname_major(probe.library):  # an unversioned name: judge by what the library says
            probe.extra["missing_sublibs"] = missing_cudnn_sublibs(probe.library, major)
    _read_header(probe, homes, "cudnn_version.h", parse_cudnn_header)
    if probe.library is not None and probe.header is None:  # cuDNN 7 and older: versions in cudnn.h
        _read_header(probe, homes, "cudnn.h", parse_cudnn_header)
    return probe


def judge_cudnn(probe: LibProbe, stack_version: str) -> Verdict:
    want = parse_version(stack_version)
    expected = {"cudnn": stack_version}
    role_fix = (f"Install cuDNN {stack_version} (cudnn role: the cudnn-linux-x86_64-{stack_version}_cudaX-archive "
                f"into /usr/local/cudnn-{stack_version}, symlinks kept), or set node.cudnn_home to where it is.")
    decoded = decode_cudnn(probe.code) if probe.code is not None else None
    note = ""
    if len(want) > 3:
        note = (f" (the library reports 3 components; compared {fmt(want[:3])}, the build number "
                f".{'.'.join(str(p) for p in want[3:])} is not visible)")
    missing = probe.extra.get("missing_sublibs") or []
    if probe.library is not None and missing:
        measured = {"library": probe.library, "missing": ", ".join(missing)}
        if probe.extra.get("library_file"):
            measured["library_file"] = probe.extra["library_file"]
        if decoded:
            measured["version"] = fmt(decoded)
        if probe.header_version:
            measured["header"] = probe.header_version
        return Verdict(Status.FAIL, f"cuDNN at {probe.library} lacks {', '.join(missing)} beside it: cuDNN loads "
                                    "its sub-libraries on first use and aborts the process when one is absent",
                       measured, expected, "Copy every lib/libcudnn* file of the cuDNN archive, symlinks kept "
                                           f"(cp -P), next to {Path(probe.library).name}; " + role_fix)
    verdict = _library_verdict("cuDNN", probe, decoded, want[:3], 3, expected, role_fix, note)
    cudart = probe.extra.get("cudart_code")
    if cudart:
        verdict.measured["built_for_cudart"] = Value(fmt(decode_cudart(cudart)))
    return verdict


@check("cuda.cudnn", "cuDNN loads and is the stack's version", isolate=True, timeout_s=60)
def cuda_cudnn(ctx: Context) -> Verdict:
    homes, use_loader = cudnn_homes(ctx.node, ctx.stack["cuda"]["version"], ctx.stack["cudnn"]["version"])
    version = ctx.stack["cudnn"]["version"]
    return judge_cudnn(probe_cudnn(homes, version, use_loader), version)


# --- torch's view --------------------------------------------------------------------------------

MATMUL_N = 256
MATMUL_TOL = 1e-4  # rtol and atol; fp32 with TF32 off agrees with the CPU to ~1e-6 at this size


@dataclass
class GpuCompute:
    index: int
    name: str | None
    max_abs_err: float | None  # |GPU - CPU| of the fixed-seed matmul
    allclose: bool
    error: str | None = None


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
                out.append(GpuCompute(i, name, err, ok))
            except Exception as exc:  # an ECC error, a lost GPU, an unsupported arch
                out.append(GpuCompute(i, name, None, False, f"{type(exc).__name__}: {exc}".strip()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return out


def judge_torch_view(probe: TorchProbe, cuda_version: str, cudnn_version: str, nccl_version: str,
                     expected_gpus: int, torch_requirement: str | None = None) -> list[Verdict]:
    expected = {"cuda": fmt(parse_version(cuda_version)[:2]), "cudnn": cudnn_version, "nccl": nccl_version,
                "gpus": expected_gpus}
    install = (f"Install the stack's torch ({torch_requirement or 'venv.requirements'}) with the venv role; a "
               "+cuXYZ build comes from the PyTorch index for that CUDA (venv.extra_index_url).")
    if expected_gpus == 0:
        measured = {"torch": probe.torch_version} if probe.torch_version else {}
        return [Verdict(Status.SKIP, "this node is expected to have no GPUs (node.gpus = 0): torch's CUDA view "
                                     "is not checked", measured, expected)]
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
        fix = ("Run the GPU's diagnostics (dcgmi diag -r 2), look for XID errors in the kernel log; drain the node "
               "if it repeats.")
        if gpu.error:
            verdicts.append(Verdict(Status.FAIL, f"a {MATMUL_N}x{MATMUL_N} fp32 matmul failed on GPU {gpu.index}: "
                                                 f"{gpu.error}", g_measured, g_expected, fix, subject=subject))
        elif not gpu.allclose:
            verdicts.append(Verdict(Status.FAIL, f"a {MATMUL_N}x{MATMUL_N} fp32 matmul on GPU {gpu.index} differs "
                                                 f"from the CPU by up to {gpu.max_abs_err:.3g} (tolerance "
                                                 f"{MATMUL_TOL:g})", g_measured, g_expected, fix, subject=subject))
        else:
            verdicts.append(Verdict(Status.PASS, f"{MATMUL_N}x{MATMUL_N} fp32 matmul on GPU {gpu.index} "
                                                 f"({gpu.name}) matches the CPU (max |diff| {gpu.max_abs_err:.2g})",
                                    g_measured, g_expected, subject=subject))
    return verdicts


def _torch_requirement(stack: dict) -> str | None:
    for text in stack.get("venv", {}).get("requirements", []):
        if Requirement(text).name == "torch":
            return text
    return None


@check("cuda.torch", "torch sees the stack's CUDA, cuDNN, NCCL and every GPU, and computes right on each",
       worker="torch", exclusive=True, needs=("gpu.driver",), timeout_s=120)
def cuda_torch(ctx: Context) -> list[Verdict]:
    gpus = ctx.node.gpus
    probe = probe_torch() if gpus else TorchProbe(None)
    return judge_torch_view(probe, ctx.stack["cuda"]["version"], ctx.stack["cudnn"]["version"],
                            ctx.stack["nccl"]["version"], gpus, _torch_requirement(ctx.stack))
