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

# --- robust fine-tuning (issue 11): optimizer wrappers, weight-space methods, LP-FT ---------------------------
# isort: split
from .lp_ft import LinearProbe, batchnorm_eval_, fit_linear_probe  # noqa: F401
from .merge import TPGM, fisher_diagonal, greedy_soup, uniform_soup, wise_ft, wise_ft_sweep  # noqa: F401
from .optim import FTP, SPD, DecoupledL2SP  # noqa: F401

_robust = [
    "SPD",
    "FTP",
    "DecoupledL2SP",
    "TPGM",
    "wise_ft",
    "wise_ft_sweep",
    "fisher_diagonal",
    "uniform_soup",
    "greedy_soup",
    "fit_linear_probe",
    "LinearProbe",
    "batchnorm_eval_",
]
# ------------------------------------------------------------------------------------------------------------

__version__ = "0.1.0"
__all__ = [*_weight, *_feature, *_head, *_reparam, *_robust]

# networks: create_model (timm / torchvision names; packaged ImageNet weights offline); timm is imported lazily
from .models import create_model  # noqa: E402

__all__ += ["create_model"]
