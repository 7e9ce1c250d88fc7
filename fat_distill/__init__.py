"""fat-distill: noisy-label distillation for identity embeddings with the FAT loss.

The library works without Prefect; ``flows/`` only orchestrates it.
"""

__version__ = "0.1.0"

# Imported on first use: `import fat_distill` stays free of torch (the CLI's run listing relies on it).
_LAZY = {"load_student": "fat_distill.inference", "embed_images": "fat_distill.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fat_distill' has no attribute {name!r}")


__all__ = ["__version__", "embed_images", "load_student"]
