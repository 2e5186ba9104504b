"""A test helper that is started and stopped, and so usable as a context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """Subclasses define start() and stop(); ``with Helper(...) as h`` starts and always stops."""

    def start(self) -> Self:
        """Start the helper and return it."""
        raise NotImplementedError

    def stop(self) -> object:
        """Stop the helper (idempotent); what it returns is the subclass's business."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
