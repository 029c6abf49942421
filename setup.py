# cffi's build integration needs the setup() keyword `cffi_modules`; everything else is in
# pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
