"""Data: dataset layouts → manifests, synthetic ReID data, label-noise injection, images (decoded-image
cache, batch augmentation), P×K sampling."""

from fat_distill.data.batch_transforms import BatchAugmentation, normalize_batch, to_model_input
from fat_distill.data.image_cache import CACHE_MODES, CachePolicy, ImageCache, open_image_cache
from fat_distill.data.image_dataset import (
    ImageDecodeError,
    ManifestImageDataset,
    build_label_map,
    decode_count,
    decode_image_file,
)
from fat_distill.data.images import IMAGE_SUFFIXES, check_image, find_missing_files
from fat_distill.data.layouts import LAYOUTS, DatasetLayoutError, IndexResult, index_dataset
from fat_distill.data.loading import ImageBatches, resolve_num_workers, sequential_batches
from fat_distill.data.noise import corrupt_labels, noise_summary, pair_partners
from fat_distill.data.paths import UnsafeSamplePathError, check_sample_paths, find_paths_outside_root
from fat_distill.data.sampler import IdentityBatchSampler, IdentitySampler
from fat_distill.data.synth import NuisanceConfig, SynthSummary, generate_synthetic_reid
from fat_distill.data.transforms import build_transforms, resize_image

__all__ = [
    "CACHE_MODES", "IMAGE_SUFFIXES", "LAYOUTS", "BatchAugmentation", "CachePolicy", "DatasetLayoutError",
    "IdentityBatchSampler", "IdentitySampler", "ImageBatches", "ImageCache", "ImageDecodeError", "IndexResult",
    "ManifestImageDataset", "NuisanceConfig", "SynthSummary", "UnsafeSamplePathError", "build_label_map",
    "build_transforms", "check_image", "check_sample_paths", "corrupt_labels", "decode_count", "decode_image_file",
    "find_missing_files", "find_paths_outside_root", "generate_synthetic_reid", "index_dataset", "noise_summary", "normalize_batch",
    "open_image_cache", "pair_partners", "resize_image", "resolve_num_workers", "sequential_batches",
    "to_model_input",
]
