"""The ControlNet training set: its on-disk format and the torch Dataset that reads it
(`dataset.control_dataset`). `from dataset import ControlDataset` is the public entry point."""

from dataset.control_dataset import (
    CONTROL_FILE,
    ENTRY_KEYS,
    HINT_RANGE,
    MASKED_CONTROL,
    PROMPT_FILE,
    SOURCE_DIR,
    SOURCE_SUFFIX,
    TARGET_DIR,
    TARGET_RANGE,
    TARGET_SUFFIX,
    ControlDataset,
    DatasetError,
    PromptEntry,
    read_control_record,
    read_prompt_file,
    resolve_inside,
)

__all__ = [
    "CONTROL_FILE", "ENTRY_KEYS", "HINT_RANGE", "MASKED_CONTROL", "PROMPT_FILE", "SOURCE_DIR", "SOURCE_SUFFIX",
    "TARGET_DIR", "TARGET_RANGE", "TARGET_SUFFIX", "ControlDataset", "DatasetError", "PromptEntry",
    "read_control_record", "read_prompt_file", "resolve_inside",
]
