"""Packaging: `kernels/` is installed as the subpackage `molmoe.kernels`.

A top-level importable `kernels` would shadow the Hugging Face `kernels` library that
transformers probes for, so the directory is mapped under the package instead.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["molmoe", "molmoe.*"]) + ["molmoe.kernels"]
setup(
    packages=packages,
    package_dir={"molmoe.kernels": "kernels"},
    package_data={"molmoe": ["assets/*", "serve/static/*"]},
)
