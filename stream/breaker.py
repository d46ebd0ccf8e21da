"""The dead-letter circuit breaker: stop rather than dead-letter a whole topic.

A producer that starts writing the wrong format (a schema change, a binary payload, the wrong topic)
would otherwise have every record copied to the dead-letter topic and committed, i.e. silently
dropped from the pipeline. Past a limit the service stops with an error instead, so a person looks.
"""

from __future__ import annotations

from collections import deque

from stream.settings import DeadLetterSettings


class CircuitBreakerOpen(RuntimeError):
    """Raised once the invalid-record limits are passed; consumption stops, nothing of the batch is committed."""


class DeadLetterBreaker:
    """Trips on ``max_consecutive_invalid`` invalid records in a row, or on an invalid ratio above
    ``max_invalid_ratio`` over the last ``window`` records (judged only once ``min_window`` were seen)."""

    def __init__(self, settings: DeadLetterSettings) -> None:
        self.settings = settings
        self._window: deque[bool] = deque(maxlen=settings.window)
        self._invalid_in_window = 0
        self.consecutive_invalid = 0

    def record(self, valid: bool) -> None:
        """Count one record; raises CircuitBreakerOpen when a limit is passed."""
        if len(self._window) == self._window.maxlen and not self._window[0]:
            self._invalid_in_window -= 1
        self._window.append(valid)
        if valid:
            self.consecutive_invalid = 0
        else:
            self._invalid_in_window += 1
            self.consecutive_invalid += 1
        s = self.settings
        if self.consecutive_invalid >= s.max_consecutive_invalid:
            raise CircuitBreakerOpen(
                f"dead-letter circuit breaker open: {self.consecutive_invalid} invalid records in a row "
                f"(limit dead_letter.max_consecutive_invalid={s.max_consecutive_invalid}); stopped consuming"
            )
        seen = len(self._window)
        if seen >= s.min_window and self._invalid_in_window / seen > s.max_invalid_ratio:
            raise CircuitBreakerOpen(
                f"dead-letter circuit breaker open: {self._invalid_in_window} of the last {seen} records invalid "
                f"(ratio {self._invalid_in_window / seen:.2f} > dead_letter.max_invalid_ratio={s.max_invalid_ratio}); "
                "stopped consuming"
            )
