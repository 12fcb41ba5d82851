"""Triton GPU kernels, each beside a plain-torch reference (`<name>_ref`) used as its test oracle.

Import the submodules directly (`from baton_kernels.paged_decode_attention import ...`); they
need triton, and this file stays empty so that importing the package is cheap. The package was
`kernels/` until transformers 5.25 came to require Hugging Face's `kernels` package: a top-level
`kernels` of ours hid it (transformers' `from kernels import ...` failed) and an install of Baton
would have overwritten it.
"""
