"""Build step for the optional C parts of the chunker (everything else is in pyproject.toml).

Both are optional: where no C compiler exists the install goes on without them, and the package
uses its Python paths instead: `_wordpiece.c` (ids and offsets; else kitoken / HF `tokenizers`,
documents/native_wordpiece.py) and `_python_lines.c` (logical lines; else NumPy, python_lines.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hades_gpu.documents._wordpiece",
            ["hades_gpu/documents/_wordpiece.c"],
            extra_compile_args=["-O3", "-Wall"],
            optional=True,
        ),
        Extension(
            "hades_gpu.documents._python_lines",
            ["hades_gpu/documents/_python_lines.c"],
            extra_compile_args=["-O3", "-Wall"],
            optional=True,
        ),
    ]
)
