"""A fake Kubernetes API server, over real HTTP, for the endpoints the kubernetes launcher
calls (create, get, list and watch, delete pods), with a fake kubelet that runs each pod's
container as a local process from the pod's command, args and env.

It is not Kubernetes: one namespace, equality label selectors only, no scheduling, no
admission, every pod at 127.0.0.1. What it keeps faithful is what the launcher relies on: the
wire format the real client library (lightkube) speaks, resource versions (a list says the
version it was taken at; a watch starts with the current pods, or resumes after a version, or
is answered 410 Gone once that version's history is compacted), grace periods (SIGTERM, then
SIGKILL; every delete's ``gracePeriodSeconds`` is recorded in ``deletes``), a grace of 0 as
Kubernetes has it (a force delete: the object is gone at once, its container is killed later,
when the kubelet notices), container exit codes (128 + signal), and pods that stay Failed
until deleted (``restartPolicy: Never``). ``node_kill`` stands for a node that kills a
container (OOM, a crash): the process gets SIGKILL and its pod reports it. ``calls`` and
``verbs`` record what was asked, in the terms of an RBAC Role.

Every process it starts is ended by its PID in ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?$")
# How long after a force delete (grace 0) the kubelet kills the container: the object is gone
# at once, the process is not.
FORCE_KILL_DELAY_S = 0.5


class FakeKube:
    def __init__(self, logs: Path, namespace: str = "meshserve",
                 secrets: dict[str, Path] | None = None) -> None:
        self.logs = logs
        self.namespace = namespace
        # Secrets by name, each a folder of its files. A pod's Secret volume stands for that
        # folder: its container's arguments under the mount path are read from the folder
        # (a process has no mount namespace here). A pod whose Secret does not exist never
        # starts (Kubernetes: FailedMount, the pod stays Pending).
        self.secrets = secrets or {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.calls: list[tuple[str, str]] = []  # (method, pod name or "" for the collection)
        self.verbs: set[str] = set()  # the RBAC verbs those calls need
        self.deletes: list[tuple[str, int]] = []  # (pod name, gracePeriodSeconds)
        self.conflicts = 0  # creates answered 409: the name was taken
        self.created: list[str] = []  # names of the pods created, in order
        self.lists = 0  # lists of the pod collection answered
        # Events a deafened watch did not deliver: (type, pod name).
        self.swallowed: list[tuple[str, str]] = []
        self._after_list: list[Any] = []
        self._started: list[asyncio.subprocess.Process] = []  # every process, for close
        self._rv = 0
        self._history: list[tuple[int, str, dict[str, Any]]] = []
        self._compacted_rv = 0
        self._deaf = False
        self._watchers: list[tuple[dict[str, str], asyncio.Queue[Any]]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for q in [q for _, q in self._watchers]:
            q.put_nowait(None)
        for proc in self._started:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for proc in self._started:
            try:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def pids(self) -> dict[str, int]:
        """Live processes by pod name (a force-deleted pod's, until it is killed, too)."""
        return {name: p.pid for name, p in self.procs.items() if p.returncode is None}

    def node_kill(self, name: str) -> None:
        """The node kills the pod's container (SIGKILL)."""
        self.procs[name].kill()

    def deafen_watches(self) -> None:
        """Open watches stop receiving events (a connection that died silently)."""
        self._deaf = True

    def break_watches(self) -> None:
        """End every open watch stream and forget the event history (an API server restart):
        a watch resumed from an older version is answered 410 Gone, as Kubernetes does once
        it has compacted the history."""
        self._history.clear()
        self._compacted_rv = self._rv
        self._deaf = False
        for _, queue in self._watchers:
            queue.put_nowait(None)

    def delete_now(self, name: str) -> None:
        """Remove a pod at once (a force delete), its process killed."""
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            proc.kill()
        self._remove(name)

    def after_next_list(self, action: Any) -> None:
        """Run ``action`` right after the next list is answered, before anything else (a
        change that lands between a client's list and its watch)."""
        self._after_list.append(action)

    def live(self) -> list[str]:
        return sorted(n for n, p in self.pods.items()
                      if p["status"]["phase"] in ("Pending", "Running")
                      and "deletionTimestamp" not in p["metadata"])

    # -- the store ------------------------------------------------------------------------

    def _emit(self, kind: str, pod: dict[str, Any]) -> None:
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        snapshot = json.loads(json.dumps(pod))
        self._history.append((self._rv, kind, snapshot))
        for selector, queue in self._watchers:
            if not _matches(snapshot, selector):
                continue
            if self._deaf:
                self.swallowed.append((kind, pod["metadata"]["name"]))
            else:
                queue.put_nowait({"type": kind, "object": snapshot})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the kubelet ----------------------------------------------------------------------

    async def _run(self, name: str) -> None:
        pod = self.pods.get(name)
        if pod is None:
            return  # deleted before its container started
        container = pod["spec"]["containers"][0]
        env = dict(os.environ)
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
                env[var["name"]] = "127.0.0.1"
        argv = [_expand(a, env) for a in container.get("command", []) + container.get("args",
                                                                                       [])]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret", {}).get("secretName")
            if secret is None:
                continue
            if secret not in self.secrets:
                return  # FailedMount: it stays Pending
            argv = [str(self.secrets[secret]) + a[len(mount["mountPath"]):]
                    if a.startswith(mount["mountPath"] + "/") else a for a in argv]
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=out,
                                                        stderr=asyncio.subprocess.STDOUT,
                                                        stdin=asyncio.subprocess.DEVNULL)
        self.procs[name] = proc
        self._started.append(proc)
        if self.pods.get(name) is not pod:  # deleted while its container started
            proc.kill()
            await proc.wait()
            return
        pod["status"] = {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [
            {"name": container["name"], "image": container["image"], "imageID": "",
             "ready": True, "restartCount": 0, "state": {"running": {"startedAt": _now()}}}]}
        self._emit("MODIFIED", pod)
        rc = await proc.wait()
        if self.pods.get(name) is not pod:
            return  # force-deleted: the object went before its process
        code = 128 - rc if rc < 0 else rc  # killed by a signal: 128 + its number
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["containerStatuses"][0].update(ready=False, state={"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "finishedAt": _now()}})
        if "deletionTimestamp" in pod["metadata"]:
            self._remove(name)
        else:
            self._emit("MODIFIED", pod)

    def _remove(self, name: str) -> None:
        pod = self.pods.pop(name, None)
        if pod is not None:
            self._emit("DELETED", pod)

    async def _terminate(self, name: str, grace_s: int) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.returncode is not None:
            self._remove(name)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _kill_later(self, proc: asyncio.subprocess.Process | None) -> None:
        """After a force delete: the kubelet notices the pod is gone and kills its
        container."""
        if proc is None or proc.returncode is not None:
            return
        await asyncio.sleep(FORCE_KILL_DELAY_S)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    # -- HTTP -----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    key, _, value = h.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if await self._handle(method, target, body, writer):
                    return  # a watch: the connection was its stream
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, method: str, target: str, body: bytes,
                      writer: asyncio.StreamWriter) -> bool:
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        m = POD_PATH.match(url.path)
        if m is None or unquote(m.group(1)) != self.namespace:
            self._reply(writer, 404, _status(404, f"no route for {url.path}"))
            return False
        name = unquote(m.group(2) or "")
        self.calls.append((method, name))
        watch = query.get("watch") in ("true", "1")
        self.verbs.add({"GET": "watch" if watch else "get" if name else "list",
                        "POST": "create", "DELETE": "delete", "PUT": "update",
                        "PATCH": "patch"}.get(method, method.lower()))
        if method == "GET" and not name and query.get("watch") in ("true", "1") \
                and query.get("resourceVersion") and \
                int(query["resourceVersion"]) < self._compacted_rv:
            self._reply(writer, 410, _status(410, "too old resource version"))
            return False
        if method == "GET" and not name and query.get("watch") in ("true", "1"):
            await self._watch(writer, _selector(query.get("labelSelector", "")),
                              query.get("resourceVersion"))
            return True
        if method == "GET" and not name:
            selector = _selector(query.get("labelSelector", ""))
            items = [p for p in self.pods.values() if _matches(p, selector)]
            self.lists += 1
            self._reply(writer, 200, {"kind": "PodList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self._rv)},
                                      "items": items})
            await writer.drain()
            while self._after_list:
                self._after_list.pop(0)()
        elif method == "GET":
            pod = self.pods.get(name)
            self._reply(writer, 200 if pod else 404, pod or _status(404, f"pod {name} not found"))
        elif method == "POST" and not name:
            pod = json.loads(body)
            pname = pod["metadata"]["name"]
            if pname in self.pods:
                self.conflicts += 1
                self._reply(writer, 409, _status(409, f"pod {pname} already exists"))
                return False
            pod["metadata"].update(uid=str(uuid.uuid4()), namespace=self.namespace,
                                   creationTimestamp=_now())
            pod["status"] = {"phase": "Pending"}
            self.pods[pname] = pod
            self.created.append(pname)
            self._emit("ADDED", pod)
            self._reply(writer, 201, pod)
            self._spawn(self._run(pname))
        elif method == "DELETE" and name:
            pod = self.pods.get(name)
            if pod is None:
                self._reply(writer, 404, _status(404, f"pod {name} not found"))
                return False
            options = json.loads(body) if body else {}
            grace = int(query.get("gracePeriodSeconds", options.get(
                "gracePeriodSeconds", pod["spec"].get("terminationGracePeriodSeconds", 30))))
            self.deletes.append((name, grace))
            if grace == 0:  # a force delete: the object is gone now, its process later
                self._remove(name)
                self._reply(writer, 200, pod)
                self._spawn(self._kill_later(self.procs.get(name)))
                return False
            if "deletionTimestamp" not in pod["metadata"]:
                pod["metadata"].update(deletionTimestamp=_now(),
                                       deletionGracePeriodSeconds=grace)
                self._emit("MODIFIED", pod)
                self._spawn(self._terminate(name, grace))
            self._reply(writer, 200, pod)
        else:
            self._reply(writer, 405, _status(405, f"{method} {url.path} is not supported"))
        return False

    async def _watch(self, writer: asyncio.StreamWriter, selector: dict[str, str],
                     since: str | None) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if since:
            for rv, kind, pod in self._history:
                if rv > int(since) and _matches(pod, selector):
                    queue.put_nowait({"type": kind, "object": pod})
        else:  # no version: the current pods first, as ADDED
            for pod in self.pods.values():
                if _matches(pod, selector):
                    queue.put_nowait({"type": "ADDED", "object": json.loads(json.dumps(pod))})
        entry = (selector, queue)
        self._watchers.append(entry)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while (event := await queue.get()) is not None:
                data = json.dumps(event).encode() + b"\n"
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self._watchers.remove(entry)

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        reason = {200: "OK", 201: "Created", 404: "Not Found", 405: "Method Not Allowed",
                  409: "Conflict", 410: "Gone"}[code]
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


def _selector(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, unquote(text).split(",")):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def _matches(pod: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                  arg)


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": {404: "NotFound", 409: "AlreadyExists", 410: "Expired"}.get(
                code, "BadRequest"),
            "code": code}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
