"""Third-party noise kept off the console.

transformers 5 made `<Model>ImageProcessor` its torchvision backend. Where torchvision is not
installed (this project does not need it), `from transformers import CLIPImageProcessor` falls
back to `CLIPImageProcessorPil` and logs a warning saying so. diffusers' IP-adapter loader
imports CLIPImageProcessor and SiglipImageProcessor whenever StableDiffusionPipeline is imported,
so every process that loads the policy (the driver, each sampler, the learner) printed those two
warnings, about classes it never uses. Our own image processors are chosen explicitly, PIL
(rewards/aesthetic.py, rewards/alignment.py), so the fallback changes nothing here; `quiet()`
drops exactly that message and nothing else of transformers. `ddpo/__init__.py` calls it, so it
is in place before any ddpo module imports diffusers.
"""

from __future__ import annotations

import logging

FALLBACK_LOGGER = "transformers.utils.import_utils"
FALLBACK_MESSAGE = "requires torchvision (not installed); falling back to"


class DropTorchvisionFallback(logging.Filter):
    """Drops transformers' "`X` requires torchvision (not installed); falling back to `XPil`"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FALLBACK_MESSAGE not in record.getMessage()


def quiet() -> None:
    """Install the filter on the logger that warns (idempotent; needs no transformers import)."""
    logger = logging.getLogger(FALLBACK_LOGGER)
    if not any(isinstance(f, DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(DropTorchvisionFallback())
