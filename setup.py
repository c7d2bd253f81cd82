"""The native part of the build: one optional C extension (the rest is in pyproject.toml).

``optional=True``: a machine without a compiler still installs the package, and the
dataplane runs the pure-Python codecs (encap/native.py warns once and says so).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "encap._native",
            ["encap/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
