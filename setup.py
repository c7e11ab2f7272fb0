"""Build script: maps the top-level folders onto the ``novacron`` namespace and
compiles the Cython extensions in ``native/``.

The repository keeps ``agent/``, ``coordinator/``, ``native/`` ... at the top so
the architecture is visible; installed, they become ``novacron.agent`` etc. so
nothing generic lands in site-packages.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent

# installed package name -> folder in the repository
PACKAGE_ROOTS = {
    "novacron": "novacron",
    "novacron.agent": "agent",
    "novacron.native": "native",
    "novacron.coordinator": "coordinator",
    "novacron.bench": "bench",
    "novacron.models": "models",
}

# Portable optimisation only: wheels must run on any x86-64 host, so no
# -march=native. Kernels that want AVX2 use function multiversioning instead.
COMPILE_ARGS = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function"]


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for name, folder in PACKAGE_ROOTS.items():
        package_dir[name] = folder
        packages.append(name)
        packages.extend(f"{name}.{sub}" for sub in find_packages(folder))
    return packages, package_dir


def _extensions() -> list[Extension]:
    import numpy

    exts = []
    for pyx in sorted((HERE / "native").glob("*.pyx")):
        exts.append(
            Extension(
                f"novacron.native.{pyx.stem}",
                [str(pyx.relative_to(HERE))],
                include_dirs=[numpy.get_include(), "native"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=COMPILE_ARGS,
            )
        )
    if not exts:
        return []
    from Cython.Build import cythonize

    return cythonize(
        exts,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    )


class BuildExt(build_ext):
    """Turns a missing or broken C compiler into one clear error."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # setuptools raises several unrelated types here
            if "command" in str(exc).lower() or "compiler" in str(exc).lower() or "gcc" in str(exc):
                sys.stderr.write(
                    "\nerror: novacron's Cython extensions need a working C compiler and the "
                    "Python headers.\n       On Debian/Ubuntu: apt-get install -y build-essential "
                    "python3-dev\n"
                )
            raise


packages, package_dir = _packages()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "novacron.native": ["*.pyx", "*.pxd", "*.pyi", "*.h"],
        "novacron.models": ["*.onnx", "*.json", "*.jsonl"],
        "novacron": ["py.typed"],
        "novacron.agent.guest": ["workload.c", "softdirty_check.c", "init.sh", "diskload.c", "disk.sh"],
        "novacron.coordinator.dashboard": ["*.html", "*.js", "*.css"],
        "novacron.coordinator.store": ["pg_migrations/*.sql"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
