"""dbae: Diffusion Bridge AutoEncoders.

Main entry points: :class:`dbae.model.DBAE`, :func:`dbae.config.get_preset`,
:class:`dbae.bridge.VPBridge` (the reference math) and the ``dbae`` command line.
"""

__version__ = "0.1.0"

from .bridge import BridgeConfig, VPBridge, karras_grid  # noqa: E402
from .config import ModelConfig, TrainConfig, get_preset  # noqa: E402

__all__ = ["BridgeConfig", "VPBridge", "karras_grid", "ModelConfig", "TrainConfig", "get_preset", "__version__"]
