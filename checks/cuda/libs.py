"""``cuda.nccl`` and ``cuda.cudnn``: the libraries load, and are the stack's versions.

They are read the way a program would: the real shared library is loaded with ctypes and its own
version function called (``ncclGetVersion``, ``cudnnGetVersion``), which needs neither a GPU nor a
driver. Headers are read too, so a header and a library from different installs are caught. Loading
a library runs its initialisers, and a broken one can crash the process, so both checks run isolated
in a worker process of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from checks.cuda.prefixes import cudnn_homes, lib_dirs, nccl_homes, read_text
from checks.cuda.versions import (
    Release,
    decode_cudart,
    decode_cudnn,
    decode_nccl,
    fmt,
    parse_cudnn_header,
    parse_nccl_header,
    parse_version,
    same,
)
from checks.registry import Context, check
from checks.result import Status, Value, Verdict

# --- finding and loading a library ---------------------------------------------------------------


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


def _header_near(library: str, home_includes: list[Path], name: str) -> Path | None:
    """The header that belongs to a library: <home>/include, else <libdir>/../include, else /usr/include."""
    lib_include = Path(library).resolve().parent.parent / "include"
    for d in [*home_includes, lib_include, Path("/usr/include")]:
        if Path(d, name).is_file():
            return Path(d, name)
    return None



# --- calling its version function ----------------------------------------------------------------


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
        probe.header_version = fmt(parse(read_text(header) or ""))


# --- NCCL ----------------------------------------------------------------------------------------


def probe_nccl(homes: list[str], use_loader: bool = True) -> LibProbe:
    probe = _probe_library(homes, ["libnccl.so.2", "libnccl.so"], "nccl", "ncclGetVersion", True, use_loader)
    _read_header(probe, homes, "nccl.h", parse_nccl_header)
    return probe


def _library_verdict(what: str, probe: LibProbe, decoded: Release | None, want: Release, parts: int,
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


def cudnn_names(stack_version: str) -> list[str]:
    """Sonames to try: the stack's major first, then the others."""
    major = parse_version(stack_version)[0]
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
