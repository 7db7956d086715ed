"""The actor runtime: a mailbox on an asyncio queue, owned tasks, explicit lifecycle.

An actor owns its state; other code talks to it only through ``tell`` (fire a message) and
``ask`` (a message plus a future for the answer, always with a timeout). ``start`` returns when
the actor is ready, ``drain`` lets it finish what is in its mailbox, ``aclose`` stops it: every
task it owns is cancelled and awaited, and every ask still pending fails with ActorStopped, so
nobody waits forever on a dead actor.

The data path does not go through mailboxes (see mesh.transport): an actor's mailbox is for
control work (commands, registrations, ticks), where clarity beats microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Self

from mesh.errors import ActorStopped

log = logging.getLogger(__name__)


class _Ask:
    __slots__ = ("future", "message")

    def __init__(self, message: Any, future: asyncio.Future[Any]) -> None:
        self.message = message
        self.future = future


class Mailbox:
    """An actor's queue. Made by the actor, or before it when others must be able to tell it
    from their own construction on (parts that tell each other in a cycle: the controller's
    routers and its WorldManager)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    def tell(self, message: Any) -> None:
        if self.closed:
            raise ActorStopped("the actor of this mailbox is stopped")
        self.queue.put_nowait(message)


class Actor:
    """Base class: override ``handle`` (and optionally ``on_start`` / ``on_stop``)."""

    def __init__(self, name: str, mailbox: Mailbox | None = None) -> None:
        self.name = name
        self._box = mailbox or Mailbox()
        self._mailbox = self._box.queue
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        self._stopped = False
        self._current: _Ask | None = None
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running or self._stopped:
            raise RuntimeError(f"actor {self.name} cannot start twice")
        await self.on_start()
        self._running = True
        self.spawn(self._mailbox_loop(), name=f"{self.name}.mailbox")

    async def drain(self, timeout_s: float) -> bool:
        """Wait until the mailbox is empty; True if it emptied in time."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._mailbox.empty() and self._running:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.005)  # the mailbox has no "became empty" event to await
        return True

    async def aclose(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._box.closed = True
        self._running = False
        try:
            await self.on_stop()
        except Exception:
            log.exception("[%s] on_stop failed", self.name)
        # Cancelling the mailbox task clears ``_current``: remember the ask being handled.
        handling = self._current
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_pending(handling)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def running(self) -> bool:
        return self._running

    # -- messaging ------------------------------------------------------------------------

    def tell(self, message: Any) -> None:
        if self._stopped:
            raise ActorStopped(f"actor {self.name} is stopped")
        self._mailbox.put_nowait(message)

    async def ask(self, message: Any, timeout_s: float) -> Any:
        if self._stopped:
            raise ActorStopped(f"actor {self.name} is stopped")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait(_Ask(message, future))
        async with asyncio.timeout(timeout_s):
            return await future

    # -- tasks ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Start a task owned by this actor: cancelled and awaited by ``aclose``."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self._stopped:
            log.error("[%s] task %s crashed", self.name, task.get_name(), exc_info=exc)
            self.failure = exc
            self.failed.set()

    async def _mailbox_loop(self) -> None:
        while True:
            item = await self._mailbox.get()
            if isinstance(item, _Ask):
                if item.future.done():
                    continue
                self._current = item
                try:
                    result = await self.handle(item.message)
                except Exception as exc:
                    if not item.future.done():
                        item.future.set_exception(exc)
                else:
                    if not item.future.done():
                        item.future.set_result(result)
                finally:
                    self._current = None
            else:
                try:
                    await self.handle(item)
                except Exception:
                    # The loop that dispatches logs and carries on; handlers fail fast.
                    log.exception("[%s] handling %r failed", self.name, type(item).__name__)

    def _fail_pending(self, handling: _Ask | None) -> None:
        if handling is not None and not handling.future.done():
            handling.future.set_exception(ActorStopped(f"actor {self.name} stopped"))
        while not self._mailbox.empty():
            item = self._mailbox.get_nowait()
            if isinstance(item, _Ask) and not item.future.done():
                item.future.set_exception(ActorStopped(f"actor {self.name} stopped"))

    # -- to override ----------------------------------------------------------------------

    async def on_start(self) -> None:
        """Acquire resources; runs before the mailbox opens."""

    async def on_stop(self) -> None:
        """Release resources; runs before owned tasks are cancelled."""

    async def handle(self, message: Any) -> Any:
        raise NotImplementedError
