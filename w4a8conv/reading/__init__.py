"""Reading a checkpoint: its files, index and description (or config.json), the filesystem under it,
and the read-ahead that keeps the disk busy. Nothing here knows about int4."""
