"""finereg: regularized fine-tuning and weight-structure constraints for PyTorch.

The public names of the four families live here; the engine is :mod:`finereg.train`, the drop-in
replacements for tllib and Keras are :mod:`finereg.compat.tllib` and :mod:`finereg.compat.keras`.
"""

from .feature import *  # noqa: F401,F403
from .feature import __all__ as _feature
from .head import *  # noqa: F401,F403
from .head import __all__ as _head
from .reparam import *  # noqa: F401,F403
from .reparam import __all__ as _reparam
from .weight import *  # noqa: F401,F403
from .weight import __all__ as _weight

__version__ = "0.1.0"
__all__ = [*_weight, *_feature, *_head, *_reparam]

# networks: create_model (timm / torchvision names; packaged ImageNet weights offline); timm is imported lazily
from .models import create_model  # noqa: E402

__all__ += ["create_model"]
