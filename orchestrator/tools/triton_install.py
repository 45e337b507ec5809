"""Where a runnable `tritonserver` lives, and the environment it needs.

Why this exists: on a machine without a Triton container the server ships inside the
`nvidia-pytriton` wheel (Triton 2.51: the binary, the python backend and one stub per
Python version), and it only runs when three things line up:

- the python backend folder holds `libtriton_python.so`, `triton_python_backend_utils.py`
  and the stub built for *this* interpreter's version side by side;
- the stub's embedded Python ignores PYTHONPATH and takes its environment from the first
  `python3` on PATH, so this interpreter's `bin` folder (the venv) must come first;
- the binary needs the wheel's `nvidia_pytriton.libs` and the stub needs
  `libpython3.X.so.1.0`, so both folders go on LD_LIBRARY_PATH.

Inside a Triton container `tritonserver` is on PATH with its own backends, and we use it
as it is.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Where the wheel's backend folder is assembled (in a checkout: .triton/, ignored by git).
BACKEND_CACHE = Path(__file__).resolve().parents[2] / ".triton" / "backends"


class LaunchError(RuntimeError):
    """The server could not be found, prepared or started; the message says why."""


@dataclass(frozen=True)
class Installation:
    """Where a runnable tritonserver lives and what its environment needs."""

    binary: Path
    backend_directory: Path | None  # None: the binary's built-in default
    library_paths: tuple[Path, ...] = ()


def _wheel_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def _python_library_dir() -> Path | None:
    """The folder holding this interpreter's libpython shared library, if it has one."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlibrary = sysconfig.get_config_var("INSTSONAME") or ""
    if libdir and ldlibrary and (Path(libdir) / ldlibrary).exists():
        return Path(libdir)
    return None


def _prepare_wheel_backends(wheel: Path, cache: Path) -> Path:
    """Assemble `<cache>/python/` from the wheel's backend and this Python's stub."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise LaunchError(f"nvidia-pytriton has no python backend stub for Python {version}: {stub}")
    source = wheel / "tritonserver" / "backends" / "python"
    target = cache / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in (source / "libtriton_python.so", source / "triton_python_backend_utils.py", stub):
        dest = target / item.name
        if not dest.exists() or dest.stat().st_size != item.stat().st_size:
            tmp = dest.with_suffix(".tmp%d" % os.getpid())
            shutil.copy2(item, tmp)
            os.replace(tmp, dest)  # atomic: parallel launchers never see half a file
    return cache


def find_installation(backend_cache: Path = BACKEND_CACHE) -> Installation:
    """Prefer `$TRITONSERVER` or a tritonserver on PATH (a Triton container), else the nvidia-pytriton wheel."""
    on_path = shutil.which(os.environ.get("TRITONSERVER") or "tritonserver")
    if on_path:
        return Installation(binary=Path(on_path), backend_directory=None)
    wheel = _wheel_root()
    if wheel is None:
        raise LaunchError(
            "tritonserver is not on PATH and the nvidia-pytriton wheel is not installed; "
            "run ./scripts/setup (or `pip install nvidia-pytriton`) first"
        )
    binary = wheel / "tritonserver" / "bin" / "tritonserver"
    libs = wheel.parent / "nvidia_pytriton.libs"
    pylib = _python_library_dir()
    if pylib is None:
        raise LaunchError(
            "this Python has no shared libpython, which the python backend stub needs; "
            "install it (Debian: apt-get install libpython3.11) or use a Python built with --enable-shared"
        )
    return Installation(
        binary=binary,
        backend_directory=_prepare_wheel_backends(wheel, backend_cache),
        library_paths=(libs, pylib),
    )


def server_environment(install: Installation, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which the stub runs this interpreter's Python and finds its libraries."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [str(p) for p in install.library_paths]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env.pop("PYTHONPATH", None)  # the stub ignores it anyway; keep the two sides alike
    return env
