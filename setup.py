"""Build step for the optional C tokenizer (everything else is in pyproject.toml).

`hades_gpu/documents/_wordpiece.c` is optional: where no C compiler exists the install goes on
without it and the tokenizer falls back to kitoken / HF `tokenizers` (documents/fast_tokenizer.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hades_gpu.documents._wordpiece",
            ["hades_gpu/documents/_wordpiece.c"],
            extra_compile_args=["-O3", "-Wall"],
            optional=True,
        )
    ]
)
