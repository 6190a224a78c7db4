"""A chunked, compressed on-disk store of preprocessed volumes (blosc2), read one crop at a time.

``spec``: where a store lives, its layout and identity; ``build``: preprocessing into it; ``read``: crops.
"""

from .build import (
    AIR_HU,
    body_bbox,
    body_level,
    build_volume,
    foreground_share,
    preprocess_config,
    preprocess_store,
    record_failure,
    records_for,
    unique_items,
    wait_for_store,
    write_manifest,
)
from .read import StoreCrops, crop_starts, padded_origin, read_crop
from .spec import (
    BLOCK,
    CHUNK,
    DTYPES,
    STORE_FORMAT,
    StoreSpec,
    StoreWriteError,
    chunk_shapes,
    source_signature,
    source_text,
    store_for,
    store_spec,
    volume_id,
)

__all__ = [
    "AIR_HU", "BLOCK", "CHUNK", "DTYPES", "STORE_FORMAT", "StoreCrops", "StoreSpec", "StoreWriteError", "body_bbox", "body_level", "build_volume",
    "chunk_shapes", "crop_starts", "foreground_share", "padded_origin", "preprocess_config", "preprocess_store",
    "read_crop", "record_failure", "records_for", "source_signature", "source_text", "store_for", "store_spec",
    "unique_items", "volume_id", "wait_for_store", "write_manifest",
]
