"""Build the optional C hot path, ``aioshm._speedups``; everything else is in pyproject.toml.

``optional=True``: where the extension cannot be built (no C compiler, no Python
headers), the build says so and goes on, and aioshm runs on its pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aioshm._speedups",
            sources=["aioshm/_speedups.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)
