"""Triton GPU kernels, each beside a plain-torch reference (`<name>_ref`) used as its test oracle.

Import the submodules directly (`from kernels.paged_decode_attention import ...`); they need
triton. This package file stays empty on purpose: transformers probes for a package named
`kernels`, so importing it must be cheap and free of side effects.
"""
