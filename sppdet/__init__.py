"""sppdet: SPP-net object detection (He, Zhang, Ren, Sun, ECCV 2014) in PyTorch.

Importing this package has no side effects; stages live in their own modules.
"""

__version__ = "0.1.0"
