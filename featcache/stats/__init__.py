"""Statistics of cached features: Hadamard matrices, streaming moments, PHI-S, angular dispersion."""

from featcache.stats.dispersion import angles, dispersion, mean_direction
from featcache.stats.hadamard import Construction, construction, hadamard
from featcache.stats.moments import Moments
from featcache.stats.phis import PhiS

__all__ = ["Construction", "Moments", "PhiS", "angles", "construction", "dispersion", "hadamard",
           "mean_direction"]
