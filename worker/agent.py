"""The worker process's actor: registration, heartbeats, world memberships, the data path.

Stateless by design: everything a worker holds (weights, memberships) can be rebuilt from the
controller's commands, so the controller may kill and replace it at any time. When it hears
nothing from the controller for ``controller_timeout_ms`` it leaves its worlds and keeps
registering, stages still loaded, until a controller (the same one after a partition heals, or
a restarted one) welcomes it; with ``--exit-on-controller-loss`` (the local launcher's
children, which must not outlive their parent) it exits instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from mesh.actor import Actor
from mesh.logs import speaker
from mesh.loop_lag import LoopLag
from mesh.messages import (
    DEFAULT_MAX_IDLE_STAGES,
    Fault,
    Heartbeat,
    Join,
    Joined,
    JoinFailed,
    Leave,
    Left,
    Message,
    Ping,
    Preload,
    Register,
    Shutdown,
    Welcome,
    WorldBroken,
    runner_identity,
)
from mesh.security import ClientKeys
from mesh.spec import DeploymentSpec
from worker.comm import Comm, CommError, default_backend, parse_addr
from worker.formation import Formation, FormationAborted
from worker.link import Link
from worker.loader import LoadError, build_handler, load_handler, split_for
from worker.rendezvous import rendezvous_store
from worker.runner import WorldRunner
from worker.splits import Split, SplitMemo, publish, receive, store_key
from worker.stage_cache import StageCache
from worker.world import Compute, RunnerStats, World

log = logging.getLogger(__name__)
# How many ended joins a worker remembers the answer of (a repeat comes within seconds).
ENDED_JOINS_KEPT = 1024


def device_uuid(device: str) -> str:
    """The UUID of a CUDA device ("" for the CPU): the same GPU under any local index."""
    if not device.startswith("cuda"):
        return ""
    import torch

    try:
        index = torch.device(device).index
        props = torch.cuda.get_device_properties(index if index is not None else 0)
        return str(getattr(props, "uuid", ""))
    except Exception:  # an old torch or a driver that does not say: fall back to the index
        log.debug("no UUID for %s", device, exc_info=True)
        return ""


class WorkerAgent(Actor):
    def __init__(
        self,
        *,
        controller: str,
        worker_id: str,
        device: str,
        threads: int = 0,
        labels: dict[str, str] | None = None,
        register_timeout_s: float = 30.0,
        advertise_host: str = "127.0.0.1",
        exit_on_controller_loss: bool = False,
        curve: ClientKeys | None = None,
    ) -> None:
        super().__init__(f"worker {worker_id}")
        self._curve = curve  # every socket to the controller is a CURVE client with these
        self.worker_id = worker_id
        self._log = speaker(log, f"worker {worker_id}")
        self.device = device
        self.threads = threads
        self.labels = labels or {}
        self._context: zmq.Context[Any] = zmq.Context()
        self._controller = controller
        self._link = Link(self._context, controller, worker_id, on_control=self._on_control,
                          curve=curve)
        # The device, shared by every world's runner: one computation at a time.
        self._compute = Compute()
        # Counters of runners that ended, so the heartbeat's totals never go backwards.
        self._retired = RunnerStats()
        self._loader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        # Forming a world blocks until every rank arrives: each formation gets its own thread,
        # so two worlds forming in opposite orders on two workers cannot deadlock.
        self._form_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="form")
        self._runners: dict[int, WorldRunner] = {}
        self._stuck: list[WorldRunner] = []  # runners let go of before their thread ended
        # Worlds whose join is loading or forming, and the switch that aborts it.
        self._joining: dict[tuple[int, int], Formation] = {}
        # Registrations since the start: a join's answer goes only to the controller that
        # sent it (see _answer).
        self._registration = 0
        # The answers already given to joins, for a repeat of one (the controller sends a
        # join again until it is answered): the Joined of each world held, and how the last
        # ENDED_JOINS_KEPT others ended (JoinFailed, or Left).
        self._joined: dict[int, Joined] = {}
        self._ended: OrderedDict[tuple[int, int], JoinFailed | Left] = OrderedDict()
        self._stages = StageCache(DEFAULT_MAX_IDLE_STAGES, size_of=self._stage_bytes,
                                  on_drop=self._dropped_stage)
        # The cut of each deployment's model this worker measured or received first (used
        # only on the loader thread).
        self._splits = SplitMemo()
        self._advertise_host = advertise_host
        self._store: Any = None
        self.store_addr = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat_interval_s = 0.2
        self._controller_timeout_s = register_timeout_s
        # Exit when the controller goes silent (the local launcher's children: they must not
        # outlive their parent); otherwise stop serving and keep registering until one answers.
        self._exit_on_loss = exit_on_controller_loss
        self._rejoining = False
        self._last_heard = time.monotonic()
        self._welcomed = asyncio.Event()
        self._packed_replies = False  # what the controller's last welcome said
        self.stopped = asyncio.Event()
        self.exit_reason = ""
        self._seq = 0
        self._device_uuid = ""
        self._drop_joins = 0  # fault injection: joins still to drop (Fault.drop_joins)

    async def on_start(self) -> None:
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        # This worker's rendezvous store: worlds whose rank 0 lives here meet in it, each under
        # a prefix of its own (world id, epoch and token), so a store outlives any one world.
        # It listens on the advertise address only (worker/rendezvous.py).
        self._store = rendezvous_store(self._advertise_host, timeout_s=60.0)
        self.store_addr = f"{self._advertise_host}:{self._store.port}"
        self._device_uuid = device_uuid(self.device)
        self._loop = asyncio.get_running_loop()
        self._link.start()
        self._register()
        self.spawn(self._heartbeat_loop(), name=f"{self.name}.heartbeat")
        self.spawn(self._watchdog(), name=f"{self.name}.watchdog")

    async def on_stop(self) -> None:
        for formation in self._joining.values():
            formation.abort("the worker is stopping")  # no formation thread left waiting
        await self._stop_runners(timeout_s=5.0)
        self._link.close()
        self._loader_pool.shutdown(wait=False, cancel_futures=True)
        self._form_pool.shutdown(wait=False, cancel_futures=True)
        if self._stuck:
            # A runner still blocked in a world's receive (a peer that neither closes nor
            # answers) holds its socket: terminating ZeroMQ would wait for it. The process
            # exits without (worker.main ends it with os._exit).
            self._log.warning("%d runner(s) still blocked at exit: %s", len(self._stuck),
                              ", ".join(r.world.label for r in self._stuck))
            return
        self._context.term()

    def _register(self) -> None:
        self._link.send(Register(worker_id=self.worker_id, pid=os.getpid(),
                                 host=socket.gethostname(), device=self.device,
                                 device_uuid=self._device_uuid, store_addr=self.store_addr,
                                 labels=self.labels))

    def stop(self, reason: str) -> None:
        if not self.stopped.is_set():
            self.exit_reason = reason
            self._log.info("stopping: %s", reason)
            self.stopped.set()

    # -- control --------------------------------------------------------------------------

    def _on_control(self, message: Message) -> None:
        self._last_heard = time.monotonic()
        if isinstance(message, Ping):
            if message.register:
                self._lost_controller("the controller does not know this worker (restarted?)")
            elif message.reply:
                self._send_heartbeat()
            return
        if isinstance(message, Welcome):
            self._heartbeat_interval_s = message.heartbeat_interval_ms / 1000.0
            self._controller_timeout_s = message.controller_timeout_ms / 1000.0
            self._stages.set_limits(max_idle=message.max_idle_stages,
                                    max_bytes=message.max_stage_bytes)
            self._packed_replies = message.packed_replies
            self._welcomed.set()
            return
        if isinstance(message, Shutdown):
            self.stop(f"controller asked: {message.reason}")
            return
        if self.stopped.is_set() or not self.running:
            return  # stopping: nothing new starts
        if isinstance(message, Fault):
            self._log.warning("fault injected: +%.0f ms per computation%s", message.delay_ms,
                              f", the next {message.drop_joins} join(s) dropped"
                              if message.drop_joins else "")
            self._compute.delay_s = message.delay_ms / 1000.0
            self._drop_joins = message.drop_joins
            return
        if isinstance(message, Join) and self._drop_joins > 0:
            # Fault injection (tests): a join lost on its way, as on a connection torn down.
            self._drop_joins -= 1
            self._log.warning("fault injected: join of world %d/%d dropped", message.world_id,
                              message.epoch)
            return
        self.tell(message)

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Join):
            self.spawn(self._join(message), name=f"{self.name}.join.{message.world_id}")
        elif isinstance(message, Leave):
            self.spawn(self._leave(message), name=f"{self.name}.leave.{message.world_id}")
        elif isinstance(message, Preload):
            self.spawn(self._preload(message), name=f"{self.name}.preload")

    async def _preload(self, msg: Preload) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if self._stages.full:
            self._log.info("preload of %s stage %d skipped: the stages held take %d bytes, "
                           "max_stage_bytes is %d", msg.deployment.name, msg.rank,
                           self._stages.bytes, self._stages.max_bytes)
            return
        try:
            await loop.run_in_executor(self._loader_pool, self._handler_for, msg.deployment,
                                       msg.rank, msg.size)
        except LoadError as exc:
            self._log.warning("preload of %s stage %d failed: %s", msg.deployment.name,
                              msg.rank, exc)
            return
        self._log.info("preloaded %s stage %d/%d in %.0f ms", msg.deployment.name, msg.rank,
                       msg.size, (time.perf_counter() - started) * 1000.0)

    def _broken_from_thread(self, world_id: int, epoch: int, reason: str, peer_lost: bool) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._send_broken, world_id, epoch, reason, peer_lost)

    def _send_broken(self, world_id: int, epoch: int, reason: str, peer_lost: bool) -> None:
        self._link.send(WorldBroken(world_id=world_id, epoch=epoch, reason=reason,
                                    peer_lost=peer_lost))

    def _handler_for(self, deployment: DeploymentSpec, rank: int, size: int,
                     world: int | None = None, *, split: Split | None = None,
                     decided: bool = False) -> Any:
        """The stage's handler, loaded unless held; pinned while ``world`` uses it. Its model
        is cut at ``split`` when ``decided`` (rank 0's cut, received), else where this worker
        cut the deployment before, else where ``split_for`` decides now (worker/splits.py).
        A stage is held under its cut's points."""
        built = None
        memo = f"{size}:{deployment!r}"
        if size > 1 and decided:
            self._splits.remember(memo, split)  # a later world this worker leads cuts so too
        elif size > 1 and memo in self._splits:
            split = self._splits.get(memo)
        elif size > 1:
            built = build_handler(deployment)  # built once: measured, then loaded
            split = split_for(built, deployment, self.device, size)
            self._splits.remember(memo, split)
        key = (deployment.name, rank, size, repr(deployment),
               split.points if split is not None else None)
        return self._stages.get(
            key, lambda: load_handler(deployment, self.device, stage=rank, stages=size,
                                      split=split, built=built),
            world=world)

    def _stage_bytes(self, handler: Any) -> int:
        try:
            return int(handler.stage_bytes())
        except Exception:  # a handler's own override that fails: count nothing, say so
            self._log.exception("measuring the bytes of a %s stage failed",
                                type(handler).__name__)
            return 0

    def _dropped_stage(self, key: Any) -> None:
        name, rank, size, _, _ = key
        self._log.info("dropped %s stage %d/%d: no world uses it, and idle stages are kept "
                       "within max_idle_stages (%d) and max_stage_bytes (%d; %d bytes held)",
                       name, rank, size, self._stages.max_idle, self._stages.max_bytes,
                       self._stages.bytes)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # give the freed weights back to other processes

    def _world_store(self, msg: Join, formation: Formation) -> Any:
        """A client of the world's rendezvous store (in a thread of the form pool), of its
        own, that ``formation`` can close: an abort, from the event loop, makes a wait on it
        raise ``FormationAborted`` within milliseconds, whatever the rendezvous waits for."""
        host, port = parse_addr(msg.rendezvous or self.store_addr)
        backend = msg.backend or default_backend(self.device)
        return formation.store(host, port, connect_timeout_s=self._connect_timeout_s(msg),
                               timeout_s=msg.world_timeout_ms / 1000.0,
                               closable=backend == "gloo")

    @staticmethod
    def _connect_timeout_s(msg: Join) -> float:
        return max(msg.world_timeout_ms, msg.form_timeout_ms) / 1000.0

    def _comm(self, msg: Join, store: Any) -> Comm:
        """Form the world's group over ``store`` (in a thread of the form pool)."""
        return Comm(world_id=msg.world_id, epoch=msg.epoch, rank=msg.rank, size=msg.size,
                    store=store, device=self.device, timeout_s=msg.world_timeout_ms / 1000.0,
                    backend=msg.backend or default_backend(self.device),
                    connect_timeout_s=self._connect_timeout_s(msg), token=msg.token,
                    bind_host=self._advertise_host)

    async def _load_and_form(self, msg: Join, formation: Formation
                             ) -> tuple[Any, Comm | None, float]:
        """Load this rank's stage and form the world's group; also the load's milliseconds.
        Rank 0 publishes its model's cut in the world's store; a later rank of a deployment
        whose cut is not configured waits for it there before it loads (worker/splits.py)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        key = store_key(msg.world_id, msg.epoch, msg.token)
        exchange = msg.size > 1 and not msg.deployment.split_points

        def load(**cut: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(self._loader_pool, functools.partial(
                self._handler_for, msg.deployment, msg.rank, msg.size, msg.world_id, **cut))

        def wait(ready: Callable[[], bool]) -> None:
            formation.wait(ready, self._connect_timeout_s(msg), "rank 0's cut of the model")

        handler: Any = None
        load_ms = 0.0
        if msg.rank == 0 or not exchange:
            handler = await load()
            load_ms = (time.perf_counter() - started) * 1000.0
            formation.check()  # given up on while loading: nothing to form
            if msg.size == 1:
                return handler, None, load_ms
        store = await loop.run_in_executor(self._form_pool, self._world_store, msg, formation)
        try:
            if handler is None:  # a later rank: rank 0's cut first, then the load
                split = await loop.run_in_executor(self._form_pool, receive, store, key, wait)
                loading = time.perf_counter()
                handler = await load(split=split, decided=True)
                load_ms = (time.perf_counter() - loading) * 1000.0
                formation.check()
            elif exchange:
                await loop.run_in_executor(self._form_pool, publish, store, key,
                                           handler.pipeline_split)
            return handler, await loop.run_in_executor(self._form_pool, self._comm, msg,
                                                       store), load_ms
        except BaseException:
            close = getattr(store, "close", None)
            if close is not None:
                close()  # its client and socket go now, not with the next collection
            raise

    def _answer_again(self, msg: Join) -> bool:
        """A join repeated (the controller sends it again until it is answered): answer it
        as the first was answered, or not at all while that is still being worked out. True
        when ``msg`` was such a repeat; a world and epoch is formed once, however often its
        join comes."""
        key = (msg.world_id, msg.epoch)
        if key in self._joining:
            return True  # loading or forming: answered once that ends
        held = self._runners.get(msg.world_id)
        answer: Joined | JoinFailed | Left | None = self._ended.get(key)
        if held is not None and held.world.epoch == msg.epoch:
            answer = self._joined.get(msg.world_id)
            if answer is None:
                return True  # being left before it was announced: Left follows
        elif held is not None:  # world ids are never reused: a controller bug
            answer = JoinFailed(world_id=msg.world_id, epoch=msg.epoch,
                                error=f"this worker holds epoch {held.world.epoch} of the world")
        if answer is None:
            return False
        log.info("[worker %s world %d/%d] join repeated: answered again (%s)", self.worker_id,
                 msg.world_id, msg.epoch, answer.KIND)
        self._link.send(answer)
        return True

    def _answer(self, answer: Joined | JoinFailed | Left, registration: int) -> bool:
        """Send a join's answer, unless the join came from a controller this worker has
        registered with since (a restarted one numbers its worlds from 1 again: the answer
        would name one of its worlds). True when sent."""
        if registration != self._registration:
            log.info("[worker %s world %d/%d] %s not sent: the join came before this worker "
                     "registered again", self.worker_id, answer.world_id, answer.epoch,
                     answer.KIND)
            return False
        self._link.send(answer)
        return True

    def _end_join(self, answer: JoinFailed | Left, registration: int) -> None:
        """Answer a join that ended, and remember the answer for a repeat of it."""
        if self._answer(answer, registration):
            self._ended[answer.world_id, answer.epoch] = answer
            while len(self._ended) > ENDED_JOINS_KEPT:
                self._ended.popitem(last=False)

    async def _join(self, msg: Join) -> None:
        if self._answer_again(msg):
            return
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        comm: Comm | None = None
        key = (msg.world_id, msg.epoch)
        registration = self._registration
        formation = Formation(f"world {msg.world_id}/{msg.epoch}")
        self._joining[key] = formation
        runner: WorldRunner | None = None
        try:
            handler, comm, load_ms = await self._load_and_form(msg, formation)
            world = World(world_id=msg.world_id, epoch=msg.epoch, rank=msg.rank, size=msg.size,
                          deployment=msg.deployment, handler=handler, comm=comm,
                          packed_replies=self._packed_replies)
            runner = WorldRunner(world, context=self._context, endpoint=self._controller,
                                 identity=runner_identity(self.worker_id, msg.world_id,
                                                          msg.epoch, msg.token),
                                 compute=self._compute, on_broken=self._broken_from_thread,
                                 curve=self._curve)
            # Returns once the controller can route to the runner's socket.
            await loop.run_in_executor(self._form_pool, runner.start)
        except (LoadError, CommError, TimeoutError) as exc:
            if comm is not None and runner is None:
                comm.close()
            if runner is not None:
                runner.leave(drain=False)
            self._stages.release(msg.world_id)
            del self._joining[key]
            if formation.aborted:
                # Given up on by the controller (or lost with it): it hears Left, no failure.
                log.info("[worker %s world %d/%d] leaving before its join completed: formation "
                         "aborted after %.0f ms: %s%s", self.worker_id, msg.world_id, msg.epoch,
                         (time.perf_counter() - started) * 1000.0, formation.reason,
                         "" if isinstance(exc, FormationAborted) else f" ({exc})")
                self._end_join(Left(world_id=msg.world_id, epoch=msg.epoch), registration)
                return
            log.error("[worker %s world %d/%d] join failed: %s", self.worker_id, msg.world_id,
                      msg.epoch, exc)
            self._end_join(JoinFailed(world_id=msg.world_id, epoch=msg.epoch,
                                      error=f"{type(exc).__name__}: {exc}"), registration)
            return
        self._runners[msg.world_id] = runner
        del self._joining[key]
        if formation.aborted or self.stopped.is_set():
            # Told to leave while loading or forming: never announce it, just let go.
            log.info("[worker %s world %d/%d] leaving before its join completed",
                     self.worker_id, msg.world_id, msg.epoch)
            await self._end_runner(runner, drain=False, timeout_s=10.0)
            self._end_join(Left(world_id=msg.world_id, epoch=msg.epoch), registration)
            return
        form_ms = (time.perf_counter() - started) * 1000.0 - load_ms
        log.info("[worker %s world %d/%d] joined as rank %d/%d (%s, %s, load %.0f ms, form "
                 "%.0f ms)", self.worker_id, msg.world_id, msg.epoch, msg.rank, msg.size,
                 msg.deployment.name, comm.backend if comm is not None else "local",
                 load_ms, form_ms)
        joined = Joined(world_id=msg.world_id, epoch=msg.epoch, load_ms=load_ms,
                        form_ms=form_ms, inputs=handler.input_spec(),
                        describe=handler.describe(),
                        entry=runner.identity if msg.rank == 0 else "",
                        packed_dispatches=msg.rank == 0)
        self._joined[msg.world_id] = joined  # the same answer to a repeat of this join
        self._answer(joined, registration)

    async def _leave(self, msg: Leave) -> None:
        formation = self._joining.get((msg.world_id, msg.epoch))
        if formation is not None:
            # Still loading or forming: the controller gave up on the world. The join stops
            # at once (a load cannot be stopped: it stops once loaded) and says Left.
            formation.abort("the controller gave up on the world")
            return
        runner = self._runners.get(msg.world_id)
        if runner is None or runner.world.epoch != msg.epoch:
            # Never joined (its join may still be on its way): a join that comes after this
            # is answered with this Left, not formed.
            self._end_join(Left(world_id=msg.world_id, epoch=msg.epoch), self._registration)
            return
        await self._end_runner(runner, drain=not msg.abort, timeout_s=10.0)
        log.info("[worker %s world %d/%d] left", self.worker_id, msg.world_id, msg.epoch)
        self._end_join(Left(world_id=msg.world_id, epoch=msg.epoch), self._registration)

    async def _end_runner(self, runner: WorldRunner, *, drain: bool, timeout_s: float) -> None:
        """Stop one world's runner and let go of its stage. A later rank whose previous rank
        neither closes nor answers may stay blocked in the world's receive until its timeout;
        it is not waited for beyond ``timeout_s`` (it ends on its own, reporting nothing)."""
        done = runner.leave(drain=drain, timeout_s=timeout_s)
        try:
            async with asyncio.timeout(timeout_s + 1.0):
                await asyncio.wrap_future(done)
        except TimeoutError:
            log.warning("[worker %s %s] runner still busy after %.0fs; letting it go",
                        self.worker_id, runner.world.label, timeout_s)
            self._stuck.append(runner)
        self._runners.pop(runner.world.world_id, None)
        self._joined.pop(runner.world.world_id, None)
        self._retired.add(runner.stats)
        self._stages.release(runner.world.world_id)

    def _lost_controller(self, why: str) -> None:
        """Stop serving and register again (once at a time): the worlds were the lost
        controller's, and a new one forms its own; the loaded stages are kept for them."""
        if self._rejoining or self.stopped.is_set():
            return
        self._rejoining = True
        self._log.warning("%s: leaving %d world(s) and %d formation(s), registering again",
                          why, len(self._runners), len(self._joining))
        self._welcomed.clear()
        for formation in self._joining.values():
            formation.abort("lost the controller")

        async def rejoin() -> None:
            try:
                await self._stop_runners(timeout_s=2.0)
            finally:
                # World ids are the controller's, and a restarted one counts from 1 again:
                # answers given to the last one's joins must not answer the next one's.
                self._ended.clear()
                self._registration += 1
                self._rejoining = False
                self._last_heard = time.monotonic()
                self._register()

        self.spawn(rejoin(), name=f"{self.name}.rejoin")

    async def _stop_runners(self, timeout_s: float) -> None:
        """Worker stop: every world closes at once; queued requests get Unavailable (the
        controller, which drained before stopping us, re-sends anything left elsewhere)."""
        runners = list(self._runners.values())
        await asyncio.gather(*(self._end_runner(r, drain=False, timeout_s=timeout_s)
                               for r in runners))

    # -- loops ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            if self._rejoining:
                # Leaving the lost controller's worlds: register once they are all left (a
                # registration promises the controller that this worker holds no world).
                await asyncio.sleep(0.05)
                continue
            if not self._welcomed.is_set():
                # Registration may race the controller's start; say it again until welcomed.
                try:
                    async with asyncio.timeout(1.0):
                        await self._welcomed.wait()
                except TimeoutError:
                    self._register()
                    continue
            self._send_heartbeat()
            await asyncio.sleep(self._heartbeat_interval_s)

    def _send_heartbeat(self) -> None:
        self._seq += 1
        runners = list(self._runners.values())
        st = RunnerStats()
        st.add(self._retired)
        for runner in runners:
            st.add(runner.stats)
        self._link.send(Heartbeat(seq=self._seq, queued=sum(r.queued for r in runners),
                                  busy=any(r.busy for r in runners), batches=st.batches,
                                  rows=st.rows, requests=st.requests, busy_s=st.busy_s,
                                  stages=len(self._stages), idle_stages=self._stages.idle,
                                  stage_bytes=self._stages.bytes,
                                  cpu_s=time.process_time(),
                                  gen=[g for r in runners if (g := r.gen_stats()) is not None]))

    async def _watchdog(self) -> None:
        lag = LoopLag(0.25)
        while True:
            await asyncio.sleep(0.25)
            # Time this loop could not listen is not the controller's silence.
            self._last_heard += lag.tick()
            silent_s = time.monotonic() - self._last_heard
            if silent_s > self._controller_timeout_s:
                if self._exit_on_loss:
                    self.stop(f"no word from the controller for {silent_s:.1f}s")
                    return
                self._lost_controller(f"no word from the controller for {silent_s:.1f}s")
