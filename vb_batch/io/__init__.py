"""Sources, sinks, filesystems and storage encodings."""
