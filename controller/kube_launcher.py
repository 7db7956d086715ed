"""``launcher = "kubernetes"``: one pod per worker, through the Kubernetes API.

The WorldManager asks for workers exactly as it asks the local launcher; this one answers with
pods. Each pod runs ``meshctl worker`` with the worker's id, the controller's address as pods
reach it, and its own pod IP as the address its peers use. Pods are labelled with the
controller that owns them and the worker id, and, when the controller runs in a pod itself
(``MESHSERVE_POD_NAME`` and ``MESHSERVE_POD_UID`` from the downward API), owned by that pod,
so that Kubernetes deletes them with it. ``restartPolicy: Never``: a worker that dies is
replaced by the controller under a new id, never restarted in place.

One watch on the owned pods reports every end of a worker once, as the local launcher reports
a process exit. It starts from a list of the pods and resumes from that list's
``resourceVersion`` (after a break: list again, watch again), so no change between the list
and the watch is missed. Ends it reports: a container that terminated (its exit code; 137
reads as SIGKILL), a pod that failed or was deleted by someone else (a node drained,
``kubectl delete``). ``kill`` (``meshctl kill``, a hung worker) deletes a pod with a grace of
``KILL_GRACE_S`` (never 0: see there); ``stop`` (scale-down, shutdown) with the configured
grace. Either way the pod's end is reported once its container has stopped.
A controller restarted in the same pod finds its pods by label and adopts them before it
creates any (``adopt``: the first list), so no new worker takes the id, or the pod name, of an
adopted one; their workers register again by themselves. ``spawn`` refuses an id that has a
pod, and a create the API refuses never drops the record of a pod this launcher tracks.

The client library is lightkube (async, small, typed), an optional extra:
``pip install meshserve[kubernetes]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controller.launcher import LaunchError, OnExit
from mesh.logs import speaker

if TYPE_CHECKING:
    from controller.config import KubernetesConfig

log = speaker(logging.getLogger(__name__), "controller")

LABEL_APP = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_CONTROLLER = "meshserve.io/controller"
LABEL_WORKER = "meshserve.io/worker-id"
# What this launcher asks of the API, on pods in its namespace only, as RBAC verbs: the Role in
# deploy/kubernetes/launcher/rbac.yaml grants exactly these (tests check both ways).
API_VERBS = ("create", "list", "watch", "delete")
# How long a watch that broke waits before it is opened again (the API server restarted, a
# network blip): the pods keep running meanwhile; only their exits are learned late.
WATCH_RETRY_S = 1.0
MAX_REPORTED = 10_000
# A kill's grace (meshctl kill, a hung worker): the shortest that is not a force delete. With
# 0, Kubernetes removes the pod object at once while its container may still run (the kubelet
# kills it when it notices), so the scheduler could place a replacement on the GPU the old
# worker still holds. With 1, the kubelet sends SIGTERM, then SIGKILL a second later, and the
# object (and the resources it holds) stays until the container has stopped: the end this
# launcher reports is the container's.
KILL_GRACE_S = 1


# Where a worker pod finds its CURVE keys (kubernetes.keys_secret), and the group that may read
# them: the image's user (deploy/Dockerfile, USER 10001).
KEYS_PATH = "/etc/meshserve/keys"
KEYS_GROUP = 10001


def pod_name(worker_id: str) -> str:
    """A DNS-1123 name for a worker's pod."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in worker_id.lower()).strip("-")
    return f"meshserve-worker-{safe}"[:63].rstrip("-")


def exit_code(pod: dict[str, Any]) -> int | None:
    """The worker's exit as the local launcher gives it (a negative signal number, or the
    code), once its pod's container has terminated or the pod has failed; else None."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated is not None:
            code = int(terminated.get("exitCode", 0))
            return -(code - 128) if 128 < code < 160 else code  # 137: SIGKILL, -9
    if status.get("phase") in ("Failed", "Succeeded"):
        return 1 if status["phase"] == "Failed" else 0
    return None


def worker_pod(k: KubernetesConfig, worker_id: str, *, instance: str,
               owner: tuple[str, str] | None, extra_args: list[str] | None = None
               ) -> dict[str, Any]:
    """The pod that runs ``worker_id`` (pure: everything comes from the arguments)."""
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "MESH_WORKER_ID", "value": worker_id}]
    if k.threads > 0:
        env += [{"name": var, "value": str(k.threads)}
                for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")]
    env += [{"name": name, "value": value} for name, value in sorted(k.env.items())]
    container: dict[str, Any] = {
        "name": "worker",
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "command": list(k.command),
        "args": ["worker", "--controller", k.controller_address, "--worker-id", worker_id,
                 "--advertise-host", "$(POD_IP)", "--device", k.device,
                 "--threads", str(k.threads), *(extra_args or [])],
        "env": env,
    }
    if k.keys_secret:  # CURVE: the workers' key pair and the controller's public key
        container["args"] += ["--key", f"{KEYS_PATH}/worker.key_secret",
                              "--controller-key", f"{KEYS_PATH}/controller.key"]
        container["volumeMounts"] = [{"name": "keys", "mountPath": KEYS_PATH,
                                      "readOnly": True}]
    if k.resources:
        container["resources"] = {kind: dict(amounts) for kind, amounts in k.resources.items()}
    metadata: dict[str, Any] = {
        "name": pod_name(worker_id),
        "labels": {**k.labels, LABEL_APP: "meshserve", LABEL_COMPONENT: "worker",
                   LABEL_CONTROLLER: instance, LABEL_WORKER: _label_value(worker_id)},
        "annotations": {**k.annotations, "meshserve.io/worker-id": worker_id},
    }
    if owner is not None:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner[0],
                                        "uid": owner[1], "controller": True}]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": k.termination_grace_s,
        "containers": [container],
    }
    if k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        spec["tolerations"] = [dict(t) for t in k.tolerations]
    if k.keys_secret:
        # Readable by the worker's group only (0440), which the volume is given.
        spec["volumes"] = [{"name": "keys", "secret": {"secretName": k.keys_secret,
                                                       "defaultMode": 0o440}}]
        spec["securityContext"] = {"fsGroup": KEYS_GROUP}
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    else:
        spec["automountServiceAccountToken"] = False
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _label_value(value: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in value)[:63]
    return safe.strip("-_.") or "worker"


@dataclass
class _Pod:
    worker_id: str
    name: str
    created: bool = False  # the API server has it (its create returned, or it was listed)
    ended: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop()
                                       .create_future())


class KubernetesLauncher:
    """Workers as pods (module docstring)."""

    can_spawn = True

    def __init__(self, k: KubernetesConfig, *, on_exit: OnExit, client: Any = None,
                 extra_args: list[str] | None = None) -> None:
        from lightkube import AsyncClient, KubeConfig  # the optional extra

        self._k = k
        self._on_exit = on_exit
        self._extra_args = extra_args or []
        name, uid = os.environ.get("MESHSERVE_POD_NAME", ""), os.environ.get(
            "MESHSERVE_POD_UID", "")
        self._owner = (name, uid) if name and uid else None
        self.instance = _label_value(name or "meshserve")
        if client is None:
            config = None  # in-cluster (the pod's service account), else ~/.kube/config
            if k.api_server:
                from lightkube.config.models import Cluster, User

                config = KubeConfig.from_one(cluster=Cluster(server=k.api_server),
                                             user=User(), namespace=k.namespace or None)
            client = AsyncClient(config, namespace=k.namespace or None,
                                 field_manager="meshserve")
        self._client = client
        self._pods: dict[str, _Pod] = {}  # by worker id: the pods this launcher owns
        # Pod names whose end was reported (the last MAX_REPORTED: a watch re-opened after a
        # break repeats recent events, never old ones).
        self._reported: dict[str, None] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._listed = asyncio.Event()  # the first list is in: every existing pod is known
        self._tasks: set[asyncio.Task[None]] = set()  # deletes under way (kill, cleanup)
        self._closing = False
        self.api_errors = 0

    # -- the Launcher interface ----------------------------------------------------------

    async def adopt(self, timeout_s: float) -> list[str]:
        """The pods this controller's label finds, listed before anything is created: each
        is tracked (a running one's end reported when it comes, an ended one's at once and
        its pod deleted); returns the ids of the running ones. Raises LaunchError when the
        API server cannot be listed within ``timeout_s``: creating pods without knowing which
        exist could ask for one that does."""
        self._ensure_watch()
        try:
            async with asyncio.timeout(timeout_s):
                await self._listed.wait()
        except TimeoutError:
            raise LaunchError(f"cannot list the pods of {LABEL_CONTROLLER}={self.instance} "
                              f"within {timeout_s:.0f} s (is the API server reachable?)"
                              ) from None
        adopted = sorted(self._pods)
        if adopted:
            log.info("adopted %d pod(s) of a previous run: %s", len(adopted),
                     ", ".join(adopted))
        return adopted

    async def spawn(self, worker_id: str) -> int:
        if self._closing:
            raise LaunchError("launcher is shutting down")
        if worker_id in self._pods:
            raise LaunchError(f"worker {worker_id} has a pod already "
                              f"({self._pods[worker_id].name})")
        if len(self._pods) >= self._k.max_workers:
            raise LaunchError(f"kubernetes worker limit reached ({self._k.max_workers})")
        from lightkube import codecs
        from lightkube.core.exceptions import ApiError

        self._ensure_watch()
        manifest = worker_pod(self._k, worker_id, instance=self.instance, owner=self._owner,
                              extra_args=self._extra_args)
        pod = _Pod(worker_id, manifest["metadata"]["name"])
        self._pods[worker_id] = pod
        try:
            await self._client.create(codecs.from_dict(manifest))
        except Exception as exc:  # refused (409: the name is taken), unreachable, ...
            if self._pods.get(worker_id) is pod:  # never another pod's record
                del self._pods[worker_id]
            self.api_errors += 1
            why = exc.status.message if isinstance(exc, ApiError) else str(exc)
            raise LaunchError(f"cannot create pod {pod.name}: {why}") from None
        pod.created = True
        log.info("created pod %s for worker %s", pod.name, worker_id)
        return 0

    async def stop(self, worker_id: str, timeout_s: float) -> None:
        pod = self._pods.get(worker_id)
        if pod is None:
            return
        grace = min(self._k.termination_grace_s, max(KILL_GRACE_S, math.ceil(timeout_s)))
        await self._delete(pod, grace)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(pod.ended), timeout_s + 2.0)

    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> bool:
        """Delete the pod with a grace of ``KILL_GRACE_S`` (``meshctl kill``, a hung
        worker); its end is reported when its container has stopped."""
        pod = self._pods.get(worker_id)
        if pod is None:
            return False
        self._own(self._delete(pod, KILL_GRACE_S), f"launcher.kill.{worker_id}")
        return True

    def pids(self) -> dict[str, int]:
        return {wid: 0 for wid in self._pods}  # a pod has no PID the controller can use

    def room(self) -> int:
        return 0 if self._closing else self._k.max_workers - len(self._pods)

    def host(self) -> dict[str, int]:
        return {}  # no local host: the scheduler places pods

    async def aclose(self, timeout_s: float) -> None:
        self._closing = True
        pods = list(self._pods.values())
        await asyncio.gather(*(self._delete(p, self._k.termination_grace_s) for p in pods))
        if pods:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(asyncio.shield(p.ended)
                                                        for p in pods)), timeout_s)
        for task in [*self._tasks, *([self._watch_task] if self._watch_task else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._client.close()

    # -- the API --------------------------------------------------------------------------

    async def _delete(self, pod: _Pod, grace_s: int) -> None:
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.core_v1 import Pod

        try:
            await self._client.delete(Pod, pod.name, grace_period=grace_s)
            log.info("deleted pod %s (worker %s, grace %d s)", pod.name, pod.worker_id, grace_s)
        except ApiError as exc:
            if exc.status.code != 404:
                self.api_errors += 1
                log.warning("cannot delete pod %s: %s", pod.name, exc.status.message)
        except Exception as exc:
            self.api_errors += 1
            log.warning("cannot delete pod %s: %s", pod.name, exc)

    def _own(self, coro: Any, name: str) -> None:
        """Run ``coro`` as a task this launcher owns (cancelled and awaited by ``aclose``)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_watch(self) -> None:
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(
                self._watch(), name="launcher.kubernetes.watch")

    async def _watch(self) -> None:
        """List, then watch from the list's version; after any break, the same again."""
        from lightkube.resources.core_v1 import Pod

        labels = {LABEL_CONTROLLER: self.instance}
        while not self._closing:
            try:
                version = await self._list(Pod, labels)
                self._listed.set()
                async for kind, obj in self._client.watch(Pod, labels=labels,
                                                          resource_version=version):
                    self._on_event(kind, obj.to_dict() if hasattr(obj, "to_dict") else obj)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.api_errors += 1
                log.warning("pod watch failed, reopening in %.0f s: %s", WATCH_RETRY_S, exc)
            await asyncio.sleep(WATCH_RETRY_S)

    async def _list(self, pod_kind: Any, labels: dict[str, str]) -> str:
        """The owned pods as they are now, each taken as an event (an unknown one adopted, an
        ended one reported), and every tracked pod the API no longer lists reported ended
        (its DELETED event went to nobody while no watch was open). Returns the list's
        resourceVersion: the watch resumes right after it, so a change that lands between
        the list and the watch is still seen (a watch "from now" would start with the pods
        that exist, and a pod deleted in between would never be reported)."""
        # Only pods known to exist before the list was asked for can be missing from it (one
        # whose create is still under way may not be listed yet).
        before = {wid: pod for wid, pod in self._pods.items() if pod.created}
        listing = self._client.list(pod_kind, labels=labels)
        listed: dict[str, dict[str, Any]] = {}
        async for pod in listing:
            as_dict = pod.to_dict() if hasattr(pod, "to_dict") else pod
            listed[as_dict["metadata"]["name"]] = as_dict
        version = str(listing.resourceVersion)
        for wid, pod in before.items():
            if pod.name not in listed and self._pods.get(wid) is pod:
                self._on_event("DELETED", {"metadata": {
                    "name": pod.name, "annotations": {"meshserve.io/worker-id": wid}}})
        for as_dict in listed.values():
            self._on_event("ADDED", as_dict)
        return version

    def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        name = meta.get("name", "")
        worker_id = (meta.get("annotations") or {}).get("meshserve.io/worker-id", "")
        if not worker_id or name in self._reported:
            return
        known = self._pods.get(worker_id)
        if known is None:
            if kind == "DELETED" or self._closing:
                return
            # A pod of this controller from before its restart: adopt it (its worker
            # registers again by itself). One that ended meanwhile is adopted too, so that
            # its end is reported once and its pod deleted.
            known = self._pods[worker_id] = _Pod(worker_id, name, created=True)
            log.info("adopted pod %s (worker %s)", name, worker_id)
        code = exit_code(pod)
        if code is None and kind == "DELETED":
            code = -signal.SIGKILL  # gone before its container reported an end
        if code is None:
            return
        self._reported[name] = None
        if len(self._reported) > MAX_REPORTED:
            del self._reported[next(iter(self._reported))]
        self._pods.pop(worker_id, None)
        if not known.ended.done():
            known.ended.set_result(code)
        log.info("worker %s (pod %s) ended: %d%s", worker_id, name, code,
                 " (deleted)" if kind == "DELETED" else "")
        self._on_exit(worker_id, code)
        if kind != "DELETED" and not self._closing and "deletionTimestamp" not in meta:
            # A terminated pod stays until deleted (restartPolicy Never): clean it up. Its
            # container has stopped, so removing the object at once (grace 0) frees nothing
            # that is still in use.
            self._own(self._delete(known, 0), f"launcher.cleanup.{worker_id}")
