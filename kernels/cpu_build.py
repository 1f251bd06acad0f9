"""Build the C++ CPU kernel (`csrc/`) on first use and load it; say once, in words, when it can't.

The sources ship in the package and are compiled on the machine that runs them with
`torch.utils.cpp_extension` (JIT): the binary matches the installed torch exactly and needs no
wheel per platform. One build holds the portable, AVX2 and AVX-512 bodies (each compiled under its
own `#pragma GCC target`, chosen at run time), so it runs on any x86-64 CPU; its name still
carries the CPU's instruction set, the torch version and a hash of the sources, so a cache shared
between machines or upgraded in place never loads a stale binary. Builds are serialized by an
`fcntl` lock, which dies with its holder, so a build killed mid-way cannot leave later loads
waiting forever on torch's own lock file (pytorch#189245): we remove that file while we hold ours.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger("daq_vllm.kernels")

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("cpu_linear.cpp", "cpu_moe.cpp", "cpu_avx2.cpp", "cpu_avx512.cpp", "cpu_bf16.cpp", "cpu_bf16_avx2.cpp")
HEADERS = ("cpu_kernel.h", "cpu_dispatch.h")
# -fopenmp: at::parallel_for is a header template over `#pragma omp parallel`; without it the kernel
# would run on one thread. The library resolves to the libgomp that torch has already loaded.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
BUILD_SECONDS = 30  # measured 17-30 s on 2 cores; said on the first build
LOCK_WAIT_SECONDS = 900


class CpuKernelUnavailable(Exception):
    """The kernel cannot be built or loaded here; the message names the cause and the fix."""


_loaded: str | None = None  # the cause of failure once tried, or "" once loaded


def cache_root() -> Path:
    """`DAQ_CACHE_DIR`, else `$XDG_CACHE_HOME/daq_vllm`, else `~/.cache/daq_vllm`."""
    explicit = os.environ.get("DAQ_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "daq_vllm"


def build_name() -> str:
    """`daq_cpu_<isa>_torch<version>_<hash of sources and flags>`: a new name whenever any changes."""
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for name in (*SOURCES, *HEADERS):
        digest.update((SOURCE_DIR / name).read_bytes())
    isa = torch.backends.cpu.get_cpu_capability().lower()
    version = re.sub(r"[^0-9a-zA-Z]+", "_", torch.__version__)
    return f"daq_cpu_{isa}_torch{version}_{digest.hexdigest()[:12]}"


def check_toolchain() -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise CpuKernelUnavailable(f"no C++ compiler: {compiler!r} was not found; install one "
                                   "(e.g. apt install g++) or point CXX at it")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        raise CpuKernelUnavailable("ninja is not installed; pip install ninja")


@contextmanager
def build_lock(path: Path):
    """Hold an exclusive `fcntl` lock on `path`, waiting at most LOCK_WAIT_SECONDS for another build."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CpuKernelUnavailable(f"another process has held {path} for {LOCK_WAIT_SECONDS} s; "
                                               "stop it or delete that directory") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(name: str, build_dir: Path) -> None:
    from torch.utils.cpp_extension import load

    logger.warning("compiling the DAQ CPU kernel, once, ~%d s (cached in %s)", BUILD_SECONDS, build_dir)
    start = time.monotonic()
    try:
        load(name, [str(SOURCE_DIR / s) for s in SOURCES], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
             build_directory=str(build_dir), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        errors = [line.strip() for line in str(e).splitlines() if "error" in line.lower()]
        cause = errors[1] if len(errors) > 1 else (errors or [str(e)])[0]
        raise CpuKernelUnavailable(f"the build failed ({cause[:200]}); the full log is in {build_dir}") from e
    logger.info("DAQ CPU kernel built in %.0f s", time.monotonic() - start)


def _load() -> None:
    check_toolchain()
    name = build_name()
    build_dir = cache_root() / "cpu_kernel" / name
    with build_lock(build_dir.with_suffix(".lock")):
        (build_dir / "lock").unlink(missing_ok=True)  # torch's lock, left by a build that died
        library = build_dir / f"{name}.so"
        if library.exists():
            try:
                torch.ops.load_library(str(library))
            except OSError:  # a link that died half-written: build again
                shutil.rmtree(build_dir)
        if not hasattr(torch.ops.daq_cpu, "linear"):
            build_dir.mkdir(parents=True, exist_ok=True)
            _compile(name, build_dir)
    torch.library.register_fake("daq_cpu::linear")(_linear_fake)
    torch.library.register_fake("daq_cpu::bf16_linear")(_bf16_linear_fake)
    torch.library.register_fake("daq_cpu::moe")(_moe_fake)


def _linear_fake(x, codes, scale_offset, lut, out_features, group_size, isa, max_fused_m, bias=None):
    return x.new_empty((*x.shape[:-1], out_features))


def _bf16_linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _moe_fake(x, topk_weights, topk_ids, *experts_and_sizes):
    return torch.empty_like(x)


def ensure_loaded() -> None:
    """Load (building if needed) the kernel once per process; raise CpuKernelUnavailable, with the
    same message on every call, if it can't be. The first failure is also logged once."""
    global _loaded
    if _loaded is None:
        try:
            _load()
            _loaded = ""
        except CpuKernelUnavailable as e:
            _loaded = str(e)
            logger.warning("DAQ CPU kernel unavailable: %s. DAQ layers on CPU use the slower torch kernel", e)
    if _loaded:
        raise CpuKernelUnavailable(_loaded)
