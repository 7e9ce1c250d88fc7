"""fat-distill: noisy-label distillation for identity embeddings with the FAT loss.

The library works without Prefect; ``flows/`` only orchestrates it.
"""

__version__ = "0.1.0"
