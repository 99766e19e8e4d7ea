"""JIT build of the enact_cuda CUDA extension (enact_cuda/csrc) with torch.utils.cpp_extension.

- `load_extension(verbose=False)` -> the compiled module (cached per process), or raises
  `BuildError` with a one-line reason: no CUDA runtime in torch, no nvcc / CUDA_HOME, no ninja,
  or the compile failed (the compiler log is written to `<cache dir>/build.log`).
- `cuda_available_reason()` -> (ok, why): whether a build can be attempted here at all.
- Cache dir: $ENACT_CUDA_CACHE, else ~/.cache/enact_cuda/<torch version>-<arch list>.
- Architectures: $ENACT_CUDA_ARCH_LIST if set; else the visible GPUs' compute capabilities;
  without a GPU (CI build check) $TORCH_CUDA_ARCH_LIST, else "9.0".
- CLI: `python -m enact_cuda.build` compiles and prints where (works without a GPU when
  CUDA_HOME / nvcc is present; it cannot run the kernels there).
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import torch

__all__ = ["BuildError", "load_extension", "cuda_available_reason", "arch_list", "cache_dir",
           "EXTENSION_NAME"]

EXTENSION_NAME = "enact_cuda_C"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "fused_bindings.cpp", "info.cu", "cluster.cu", "fused.cu", "attn_fwd.cu",
           "attn_bwd.cu")
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]

_lock = threading.Lock()
_module = None
_error: BuildError | None = None


class BuildError(RuntimeError):
    """The CUDA extension cannot be built or loaded here (message: one line, the reason)."""


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension
    return cpp_extension.CUDA_HOME


def _nvcc(cuda_home: str | None) -> str | None:
    if cuda_home:
        cand = Path(cuda_home) / "bin" / "nvcc"
        if cand.exists():
            return str(cand)
    return shutil.which("nvcc")


def cuda_available_reason() -> tuple[bool, str]:
    """(True, "") if the extension can be compiled here, else (False, one-line reason).

    Needs: a CUDA build of torch, nvcc (CUDA_HOME or PATH), ninja. A GPU is NOT required
    (the CI build check compiles without one); running the kernels of course needs one.
    """
    if torch.version.cuda is None:
        return False, "no CUDA runtime: this torch is a CPU-only build"
    try:
        cuda_home = _cuda_home()
    except Exception as exc:  # pragma: no cover - import problems of cpp_extension
        return False, f"torch.utils.cpp_extension unusable ({type(exc).__name__}: {exc})"
    nvcc = _nvcc(cuda_home)
    if cuda_home is None or nvcc is None:
        return False, "no nvcc: set CUDA_HOME to a CUDA toolkit (nvcc not found)"
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return False, "ninja is not installed (pip install ninja)"
    return True, ""


def arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST used for the build, e.g. "9.0" or "8.0;9.0"."""
    env = os.environ.get("ENACT_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0"


def cache_dir(archs: str | None = None) -> Path:
    env = os.environ.get("ENACT_CUDA_CACHE")
    if env:
        return Path(env)
    archs = archs or arch_list()
    tag = f"{torch.__version__}-{archs}".replace(";", "_").replace(" ", "").replace("+", "_")
    return Path.home() / ".cache" / "enact_cuda" / tag


def _build(verbose: bool):
    ok, why = cuda_available_reason()
    if not ok:
        raise BuildError(why)
    from torch.utils import cpp_extension
    archs = arch_list()
    build_dir = cache_dir(archs)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    missing = [s for s in SOURCES if not (CSRC / s).exists()]
    if missing:
        raise BuildError(f"sources missing from {CSRC}: {', '.join(missing)}")
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", str(max(1, min(len(SOURCES), os.cpu_count() or 1))))
    try:
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            verbose=verbose,
            with_cuda=True,
        )
    except Exception as exc:
        log.write_text(f"{type(exc).__name__}: {exc}\n")
        raise BuildError(f"compile failed ({type(exc).__name__}); log: {log}") from exc
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    log.write_text(f"built {EXTENSION_NAME} for arch {archs} with torch {torch.__version__}\n")
    return module


def load_extension(verbose: bool = False):
    """Compile (first time; cached on disk afterwards) and import the extension module.

    Raises BuildError (one-line reason) if it cannot; the failure is remembered for the
    process, so repeated calls do not recompile.
    """
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise _error
        try:
            _module = _build(verbose)
        except BuildError as exc:
            _error = exc
            raise
        return _module


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Compile the enact_cuda CUDA extension.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    archs = arch_list()
    print(f"enact_cuda: building for arch {archs} (torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, GPU present: {torch.cuda.is_available()})", flush=True)
    try:
        module = load_extension(verbose=args.verbose)
    except BuildError as exc:
        print(f"enact_cuda: BUILD FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"enact_cuda: built {module.__file__}")
    print(f"enact_cuda: cache dir {cache_dir(archs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
