"""Ops: the masked activation and the fused conv + BN + masked activation, each with a PyTorch reference."""
from . import reference
from .conv_bn_act import conv_bn_act
from .masked_act import masked_relu

__all__ = ["conv_bn_act", "masked_relu", "reference"]
