"""PyTorch optimizers and schedulers for large-batch recipes (needs the ``torch`` extra).

* :class:`LAMB`, :class:`LANS`, :class:`LARS` and their functional forms :func:`lamb`, :func:`lans`,
  :func:`lars`: the papers' algorithms, with a single-tensor reference path, a foreach path and (LAMB,
  LANS) a fused Triton multi-tensor path, the default on CUDA; no host synchronisation in ``step()``
  (non-finite gradients skip the step on the device, counted in ``optimizer.skip_counter``);
* :func:`param_groups_for`: no weight decay / no trust ratio for biases and normalisation weights;
* :class:`RecipeLR`: a recipe's LR schedule as a torch scheduler;
* :func:`build`: ``optimizer, scheduler = build(model, recipe)``;
* :class:`GradientNoiseScale`: the gradient noise scale B_noise (McCandlish et al. 2018), nearly free;
  :func:`probe_noise_scale`: the same at the current parameters alone, from k micro-batches.
"""

from ._core import NonFiniteGradientError
from .build import build
from .grouping import param_groups_for
from .lamb import LAMB, lamb
from .lans import LANS, lans
from .lars import LARS, lars
from .noise_scale import GradientNoiseScale, NoiseProbe, probe_noise_scale
from .scheduler import RecipeLR

__all__ = [
    "LAMB",
    "LANS",
    "LARS",
    "GradientNoiseScale",
    "NoiseProbe",
    "NonFiniteGradientError",
    "RecipeLR",
    "build",
    "lamb",
    "lans",
    "lars",
    "param_groups_for",
    "probe_noise_scale",
]
