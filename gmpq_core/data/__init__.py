"""Real datasets, stratified proxy subsets and fast loaders.

    bundle = load_dataset("fashion_mnist")                  # DataBundle(info, train, test)
    small = proxy(bundle.train, 2000, seed=0)               # stratified, deterministic, nested
    loader = make_loader(small, bundle.info, batch_size=256, train=True, seed=0)
    loader.set_epoch(3)
    for x, y in loader: ...                                 # x float32 [B, C, S, S] normalised, y int64 [B]
"""
from .info import DataBundle, DatasetInfo, FolderSplit, TensorSplit
from .loader import FolderLoader, Loader, TensorLoader, default_num_workers, make_loader
from .proxy import check_subset_size, class_counts, proxy, proxy_indices
from .registry import (DATASETS, DatasetSpec, canonical_data_source, canonical_dataset_name, check_dataset_name,
                       clear_dataset_cache, list_datasets, load_dataset, other_dataset_title, register_dataset)

__all__ = [
    "DatasetInfo", "TensorSplit", "FolderSplit", "DataBundle",
    "list_datasets", "load_dataset", "check_dataset_name", "canonical_data_source", "canonical_dataset_name",
    "register_dataset", "DATASETS", "other_dataset_title",
    "DatasetSpec", "clear_dataset_cache",
    "proxy", "proxy_indices", "class_counts", "check_subset_size",
    "make_loader", "Loader", "TensorLoader", "FolderLoader", "default_num_workers",
]
