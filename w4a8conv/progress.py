"""What long work reports to: the converter, verify and synthetic call it; the command line shows it."""

from __future__ import annotations


class Progress:
    """Reports nothing; the command line's subclasses print (``w4a8conv.cli.output``)."""

    def start(self, total_bytes: int, total_modules: int) -> None:
        pass

    def update(self, event: str, name: str, nbytes: int) -> None:
        """``event``: ``copy`` / ``module`` per unit done (``nbytes`` read), ``shard`` per output file done."""

    def finish(self) -> None:
        pass
