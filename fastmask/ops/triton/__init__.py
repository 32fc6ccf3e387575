"""Triton kernels, each file one op with its launcher beside the @triton.jit code.

masked_act.py: the masked activation, forward and backward. conv_bn_act.py: the fused implicit-GEMM conv + eval-BN +
residual + masked activation. They run on CUDA, and on the CPU under TRITON_INTERPRET=1 (how CI tests them).
Imported lazily by the dispatchers so that fastmask works without Triton installed.
"""
