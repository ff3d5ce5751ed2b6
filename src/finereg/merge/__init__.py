"""Weight-space methods for robust fine-tuning: WiSE-FT (plain and Fisher-weighted), model soups, TPGM."""

from .fisher import fisher_diagonal
from .soups import GreedySoup, greedy_soup, uniform_soup
from .tpgm import TPGM
from .wise_ft import DEFAULT_ALPHAS, WiseFTSweep, wise_ft, wise_ft_sweep

__all__ = [
    "wise_ft",
    "wise_ft_sweep",
    "WiseFTSweep",
    "DEFAULT_ALPHAS",
    "fisher_diagonal",
    "uniform_soup",
    "greedy_soup",
    "GreedySoup",
    "TPGM",
]
