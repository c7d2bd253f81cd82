"""The native part of the build: one optional C extension (the rest is in pyproject.toml).

``optional=True``: a machine without a compiler still installs the package, and the
dataplane runs the pure-Python codecs (encap/native.py warns once and says so).
"""

from pathlib import Path

from setuptools import Extension, setup

# One translation unit: module.c includes the other files of encap/csrc/, so a change to
# any of them must rebuild it.
CSRC = sorted(str(p) for p in Path("encap/csrc").glob("*.[ch]"))

setup(
    ext_modules=[
        Extension(
            "encap._native",
            sources=["encap/csrc/module.c"],
            depends=CSRC,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
