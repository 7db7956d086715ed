"""Logs that say who speaks: ``[controller]``, ``[worker w3]``, ``[worker w3 world 7/1 rank 0]``.

Every component logs through a ``Speaker``, a ``LoggerAdapter`` that prefixes its messages with
the speaker's name, so a line in a combined log (the local launcher's workers write to the
controller's output) names its process and, where it matters, its world. Formatting stays lazy
(``log.info("x %s", y)``), and ``log.exception`` keeps its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class Speaker(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[{self.extra['who'] if self.extra else '?'}] {msg}", kwargs


def speaker(logger: logging.Logger, who: str) -> Speaker:
    return Speaker(logger, {"who": who})
