"""Packaging.

* `kernels/` is installed as the subpackage `molmoe.kernels`: a top-level importable `kernels`
  would shadow the Hugging Face `kernels` library that transformers probes for.
* `csrc/` is built into `molmoe/_native*.so`, a torch op library (molmoe::preprocess_crops, see
  docs/preprocessing.md). It is optional: without torch at build time (pip's build isolation), a
  C++ compiler, or with MOLMOE_NO_NATIVE=1, the install still succeeds, prints why the extension
  was skipped, and molmoe uses the Python path. Build it with
  `pip install --no-build-isolation -e .` (scripts/bootstrap.sh does).
"""
import os
import pathlib
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["molmoe", "molmoe.*"]) + ["molmoe.kernels"]
kwargs = {}


_SKIPPED = []


def _skip(why: str) -> None:
    # A library left from an earlier build would be loaded as if it were this source's.
    for stale in pathlib.Path(__file__).resolve().parent.glob("molmoe/_native*.so"):
        stale.unlink(missing_ok=True)
    if _SKIPPED:  # said once: a failed compile also fails the copy into the source tree
        return
    _SKIPPED.append(why)
    print(f"molmoe: native preprocessing NOT built ({why}); molmoe will use the Python path. "
          "Build it with: pip install --no-build-isolation -e .", file=sys.stderr)


if os.environ.get("MOLMOE_NO_NATIVE") == "1":
    _skip("MOLMOE_NO_NATIVE=1")
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _skip("torch is not importable at build time: pip's build isolation hides it")
    else:
        class OptionalBuild(BuildExtension):
            """Build the extension if the compiler works; otherwise warn and install without it."""

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as e:  # compiler missing or broken: never a failed install
                    # An earlier build's library must not be copied in as this one's.
                    pathlib.Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
                    _skip(f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}")

            def run(self):
                try:
                    super().run()
                except Exception as e:
                    _skip(f"{type(e).__name__}: {e}")

        kwargs = dict(
            ext_modules=[CppExtension(
                "molmoe._native", ["csrc/preprocess.cpp"],
                extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
                py_limited_api=False)],
            cmdclass={"build_ext": OptionalBuild.with_options(use_ninja=False)},
        )

setup(
    packages=packages,
    package_dir={"molmoe.kernels": "kernels"},
    package_data={"molmoe": ["assets/*", "serve/static/*"]},
    **kwargs,
)
