"""Extra training objectives: the total-correlation penalty of DBAE+TC (:mod:`.tc`)."""

from .tc import gaussian_log_density, gaussian_total_correlation, total_correlation

__all__ = ["gaussian_log_density", "gaussian_total_correlation", "total_correlation"]
