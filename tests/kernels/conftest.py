"""Kernel tests run the Triton kernels in the interpreter on CPU; it must be switched on before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
