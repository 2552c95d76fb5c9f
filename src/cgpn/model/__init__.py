"""Models: the CGPN network, its variants (Table 2, MGN) and the ResNet backbone."""

from cgpn.model.cgpn import CGPN, STRIPES, VARIANTS, CGPNOutput, build_model

__all__ = ["CGPN", "STRIPES", "VARIANTS", "CGPNOutput", "build_model"]
