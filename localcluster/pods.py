"""A small pod runtime: a container spec run on this machine the way a kubelet would.

A pod here is

* its own network namespace on the run's bridge (:mod:`localcluster.podnet`), with
  the hostname of the pod (UTS namespace);
* per container: its own mount and PID namespaces. The image is a root
  filesystem (:mod:`localcluster.rootfs`) under a per-pod overlay, so the root
  can be read-only while the pod's files are mounted at the container's paths,
  exactly where the manifest mounts them; or, for ``root=None``, this machine's
  own root (the Celery pods run this checkout's virtualenv), still with the
  pod's own files (``/etc/hosts``) mounted over it;
* cgroup v1 groups (memory, cpu, freezer, pids) with the container's limits;
  every process of the pod, ``exec`` calls included, is in them;
* the kubelet's behaviour: init containers to completion first, the startup
  probe then the readiness probe (the pod records when it became Ready), a
  container that exits is restarted with the kubelet's back-off, and a graceful
  stop runs the preStop hook, then SIGTERM, then SIGKILL once
  ``terminationGracePeriodSeconds`` are over.

A container's process is PID 1 of its PID namespace: killing it kills every
process the container started (Erlang's epmd daemonizes; it cannot escape).
``unshare --kill-child`` kills it if this process dies. :meth:`Pod.remove`
deletes the namespaces, cgroups and directories; the PVC directories, which the
caller owns, stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localcluster import podnet

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "freezer", "pids")
CPU_PERIOD_US = 100_000
# The kubelet's restart back-off: 10 s, doubled per restart, at most 5 minutes.
RESTART_BACKOFF_START = 10.0
RESTART_BACKOFF_MAX = 300.0
# The search path of a container's env; the images' own default is the same.
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run_cgroup(controller: str, run_id: str) -> Path:
    """The cgroup folder of one run under one controller (its pods are below it)."""
    return CGROUP_ROOT / controller / "localcluster" / run_id


class PodError(RuntimeError):
    pass


@dataclass(frozen=True)
class Mount:
    """A file or directory of this machine at ``target`` inside the container."""

    target: str
    source: Path
    read_only: bool = False


@dataclass(frozen=True)
class Probe:
    """A kubelet probe: ``exec`` inside the container, or a TCP connect to the pod."""

    exec: tuple[str, ...] = ()
    tcp_port: int | None = None
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    uid: int = 0
    gid: int = 0
    read_only_root: bool = False


@dataclass(frozen=True)
class PodSpec:
    name: str
    # The container image, as a root filesystem; None: this machine's own root.
    root: Path | None
    container: ContainerSpec
    init_containers: tuple[ContainerSpec, ...] = ()
    memory_limit: int | None = None
    cpu_limit_millis: int | None = None
    startup_probe: Probe | None = None
    readiness_probe: Probe | None = None
    pre_stop: tuple[str, ...] = ()
    grace_seconds: float = 30.0
    # restartPolicy: Always (Deployments, StatefulSets) or Never (the scheduler Job).
    restart: bool = True
    # root=None: paths of this machine the container must still see where they are
    # even when a volume is mounted over a parent (the checkout under /tmp, say).
    keep_visible: tuple[Path, ...] = ()


def _q(text: str | os.PathLike[str]) -> str:
    return shlex.quote(str(text))


def container_script(spec: PodSpec, container: ContainerSpec, pod_dir: Path) -> str:
    """The shell script that becomes the container: mounts, then exec of its argv.

    It runs as PID 1 of a new PID namespace, in new mount and UTS namespaces,
    inside the pod's network namespace. A pure function, so what a container
    sees can be read (and tested) without starting one.
    """
    lines = ["set -eu", f"hostname {_q(spec.name)}", "mount --make-rprivate /"]
    if spec.root is None:
        top = Path("/")
        kept = [(path, pod_dir / "keep" / str(i)) for i, path in enumerate(spec.keep_visible)]
        for path, hold in kept:
            lines += [f"mkdir -p {_q(hold)}", f"mount --bind {_q(path)} {_q(hold)}"]
        for m in container.mounts:
            lines.append(f"mount --bind {_q(m.source)} {_q(m.target)}")
            if m.read_only:
                lines.append(f"mount -o remount,bind,ro {_q(m.target)}")
        for path, hold in kept:
            # Back where it was, in case a mount above covered a parent of it.
            lines += [f"mkdir -p {_q(path)}", f"mount --bind {_q(hold)} {_q(path)}"]
        lines.append(f"cd {_q(top)}")
        prefix: list[str] = []
    else:
        layer = pod_dir / "layers" / container.name
        top = layer / "merged"
        lines.append(
            f"mount -t overlay overlay -o lowerdir={spec.root},upperdir={layer}/upper,"
            f"workdir={layer}/work {_q(top)}"
        )
        for m in container.mounts:
            target = f"{top}{m.target}"
            if m.source.is_dir():
                lines.append(f"mkdir -p {_q(target)}")
            else:
                lines.append(f"mkdir -p {_q(str(Path(target).parent))} && touch {_q(target)}")
            lines.append(f"mount --bind {_q(m.source)} {_q(target)}")
            if m.read_only:
                lines.append(f"mount -o remount,bind,ro {_q(target)}")
        lines += [f"mount -t proc proc {_q(top)}/proc", f"mount --rbind /dev {_q(top)}/dev"]
        if container.read_only_root:
            lines.append(f"mount -o remount,bind,ro {_q(top)}")
        lines.append(f"cd {_q(top)}")
        prefix = ["chroot", str(top)]
    env = [f"{k}={v}" for k, v in container.env]
    argv = [
        *prefix,
        "setpriv",
        f"--reuid={container.uid}",
        f"--regid={container.gid}",
        "--clear-groups",
        "env",
        "-i",
        f"PATH={CONTAINER_PATH}",
        f"HOSTNAME={spec.name}",
        *env,
        *container.argv,
    ]
    lines.append("exec " + " ".join(_q(a) for a in argv))
    return "\n".join(lines) + "\n"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class _Running:
    container: ContainerSpec
    proc: subprocess.Popen[bytes]
    pid1: int


@dataclass
class Pod:
    """One pod of a run. ``start`` it, ``wait_ready``, then ``stop``/``kill``/``remove``."""

    spec: PodSpec
    network: podnet.PodNetwork
    pod_dir: Path
    clock: Callable[[], float] = time.monotonic
    address: str = ""
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    events: list[tuple[float, str]] = field(default_factory=list)
    _running: _Running | None = None
    _stopping: bool = False
    _ready: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _gone: threading.Event = field(default_factory=threading.Event)

    # --- names -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def netns(self) -> str:
        return podnet.netns_name(self.network.run_id, self.name)

    def cgroup(self, controller: str) -> Path:
        return run_cgroup(controller, self.network.run_id) / self.name

    def log_file(self, container: str | None = None) -> Path:
        return self.pod_dir / f"{container or self.spec.container.name}.log"

    def _event(self, what: str) -> None:
        self.events.append((time.time(), what))
        log.info("pod %s: %s", self.name, what)

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Network, cgroups, init containers, then the container and its probes."""
        self._stopping = False
        self._gone.clear()
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        self.address = self.network.attach(self.name)
        self._make_cgroups()
        for container in self.spec.init_containers:
            self._run_init(container)
        self._start_container()
        self._spawn(self._supervise, "supervise")
        self._spawn(self._probe_loop, "probes")

    def _spawn(self, target: Callable[[], None], what: str) -> None:
        thread = threading.Thread(target=target, name=f"pod-{self.name}-{what}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _make_cgroups(self) -> None:
        for controller in CONTROLLERS:
            self.cgroup(controller).mkdir(parents=True, exist_ok=True)
        if self.spec.memory_limit is not None:
            (self.cgroup("memory") / "memory.limit_in_bytes").write_text(
                str(self.spec.memory_limit)
            )
        if self.spec.cpu_limit_millis is not None:
            cpu = self.cgroup("cpu")
            (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            quota = self.spec.cpu_limit_millis * CPU_PERIOD_US // 1000
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))

    def _in_cgroups(self, argv: Sequence[str]) -> list[str]:
        """``argv`` started from a shell that first moves itself into the pod's cgroups,
        so it and everything it starts belong to the pod (no preexec_fn: threads)."""
        joins = "; ".join(f"echo $$ > {_q(self.cgroup(c) / 'cgroup.procs')}" for c in CONTROLLERS)
        return ["sh", "-c", f'{joins}; exec "$@"', "sh", *argv]

    def _layer_dirs(self, container: ContainerSpec) -> None:
        if self.spec.root is None:
            return
        layer = self.pod_dir / "layers" / container.name
        for sub in ("upper", "work", "merged"):
            (layer / sub).mkdir(parents=True, exist_ok=True)

    def _popen(self, container: ContainerSpec) -> subprocess.Popen[bytes]:
        self._layer_dirs(container)
        script = container_script(self.spec, container, self.pod_dir)
        (self.pod_dir / f"{container.name}.sh").write_text(script)
        out = self.log_file(container.name).open("ab")
        try:
            return subprocess.Popen(
                self._in_cgroups(
                    [
                        # nsenter joins the pod's network namespace (unshare
                        # --net=FILE would make a new one and bind it over FILE).
                        "nsenter",
                        f"--net={podnet.NETNS_DIR / self.netns}",
                        "unshare",
                        "--mount",
                        "--uts",
                        "--pid",
                        "--fork",
                        "--kill-child",
                        "sh",
                        "-c",
                        script,
                    ]
                ),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()

    def _run_init(self, container: ContainerSpec, timeout: float = 120) -> None:
        proc = self._popen(container)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise PodError(f"pod {self.name}: init container {container.name} timed out") from None
        if code != 0:
            raise PodError(
                f"pod {self.name}: init container {container.name} exited {code}: "
                f"{self.tail(container.name)}"
            )

    def _start_container(self) -> None:
        container = self.spec.container
        proc = self._popen(container)
        deadline = time.monotonic() + 10
        while not (children := _children(proc.pid)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PodError(
                    f"pod {self.name}: container {container.name} did not start: "
                    f"{self.tail(container.name)}"
                )
            time.sleep(0.01)
        with self._lock:
            self._running = _Running(container, proc, children[0])
            self._ready = False
        self.started_at = self.clock()
        self._event(f"container {container.name} started (pid {children[0]})")

    def _supervise(self) -> None:
        """Restart a container that exits on its own, with the kubelet's back-off."""
        backoff = RESTART_BACKOFF_START
        while not self._gone.is_set():
            running = self._running
            if running is None:
                return
            code = running.proc.wait()
            self.exit_code = code
            if self._stopping or self._gone.is_set() or not self.spec.restart:
                self._set_ready(False)
                self._event(f"container exited {code}")
                return
            self._event(f"container exited {code}; restart in {backoff:.0f} s")
            self._set_ready(False)
            if self._gone.wait(backoff):
                return
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            self.restarts += 1
            try:
                self._start_container()
            except PodError as error:
                self._event(str(error))

    def wait_exit(self, timeout: float) -> int:
        """The exit code of a container that is not restarted (a Job's)."""
        running = self._running
        if running is None:
            raise PodError(f"pod {self.name} is not running")
        try:
            return running.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PodError(
                f"pod {self.name} still running after {timeout:.0f} s: {self.tail()}"
            ) from None

    # --- probes ------------------------------------------------------------------

    def _probe_once(self, probe: Probe) -> bool:
        if probe.tcp_port is not None:
            try:
                with socket.create_connection((self.address, probe.tcp_port), probe.timeout):
                    return True
            except OSError:
                return False
        try:
            return self.exec(probe.exec, timeout=probe.timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _probe_loop(self) -> None:
        started = None
        while not self._gone.is_set():
            running = self._running
            if running is None or self._stopping:
                return
            if started != running.pid1:
                # A (re)started container: startup probe first, then readiness.
                started = running.pid1
                if not self._run_startup_probe(running):
                    continue
            probe = self.spec.readiness_probe
            if probe is None:
                self._set_ready(True)
                if self._gone.wait(1):
                    return
                continue
            self._set_ready(self._probe_once(probe))
            if self._gone.wait(probe.period):
                return

    def _run_startup_probe(self, running: _Running) -> bool:
        probe = self.spec.startup_probe
        if probe is None:
            return True
        if self._gone.wait(probe.initial_delay):
            return False
        failures = 0
        while not self._gone.is_set() and self._running is running and not self._stopping:
            if self._probe_once(probe):
                self._event("startup probe succeeded")
                return True
            failures += 1
            if failures >= probe.failure_threshold:
                self._event("startup probe failed: the container is killed and restarted")
                self._kill_container(running)
                return False
            if self._gone.wait(probe.period):
                return False
        return False

    def _set_ready(self, ready: bool) -> None:
        if ready and not self._ready:
            self.ready_at = self.clock()
            self._event("Ready")
        elif not ready and self._ready:
            self._event("not Ready")
        self._ready = ready

    @property
    def ready(self) -> bool:
        return self._ready

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the container's start until Ready."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if time.monotonic() > deadline:
                raise PodError(f"pod {self.name} not Ready after {timeout:.0f} s: {self.tail()}")
            time.sleep(0.1)
        assert self.ready_at is not None and self.started_at is not None
        return self.ready_at - self.started_at

    # --- exec, signals -------------------------------------------------------------

    def exec(
        self, argv: Sequence[str], timeout: float = 60, container: ContainerSpec | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container, as ``kubectl exec`` (its user, env, root)."""
        running = self._running
        if running is None:
            raise PodError(f"pod {self.name} is not running")
        spec = container or running.container
        env = [f"{k}={v}" for k, v in spec.env]
        command = [
            "nsenter",
            f"--target={running.pid1}",
            "--mount",
            "--uts",
            "--net",
            "--pid",
            "--root",
            "--wd",
            "setpriv",
            f"--reuid={spec.uid}",
            f"--regid={spec.gid}",
            "--clear-groups",
            "env",
            "-i",
            f"PATH={CONTAINER_PATH}",
            f"HOSTNAME={self.name}",
            *env,
            *argv,
        ]
        return subprocess.run(
            self._in_cgroups(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _kill_container(self, running: _Running) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid1, signal.SIGKILL)

    def stop(self) -> float:
        """Graceful stop: preStop, SIGTERM, SIGKILL after the grace period. Returns seconds."""
        running = self._running
        begin = time.monotonic()
        self._stopping = True
        if running is None:
            return 0.0
        deadline = begin + self.spec.grace_seconds
        if self.spec.pre_stop:
            self._event("preStop hook")
            try:
                done = self.exec(self.spec.pre_stop, timeout=self.spec.grace_seconds)
                self._event(f"preStop hook exited {done.returncode}")
            except subprocess.TimeoutExpired:
                self._event("preStop hook outlived the grace period")
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid1, signal.SIGTERM)
        self._event("SIGTERM")
        try:
            running.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._event("grace period over: SIGKILL")
            self._kill_container(running)
            running.proc.wait()
        self._set_ready(False)
        return time.monotonic() - begin

    @property
    def pid(self) -> int | None:
        """This machine's pid of the container's PID 1 (the container's main process)."""
        running = self._running
        return None if running is None else running.pid1

    def running(self) -> bool:
        running = self._running
        return running is not None and running.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL every process of the pod at once (a crashed machine, a kill -9)."""
        running = self._running
        self._stopping = True
        if running is not None:
            self._kill_container(running)
        self._kill_members()
        # A frozen process dies of its SIGKILL only once thawed (a lost machine's pod).
        if self.frozen():
            self.thaw()
        if running is not None:
            running.proc.wait()
        # Until the cgroup is empty: what started meanwhile (a probe's exec) goes too.
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            self._kill_members()
            time.sleep(0.02)
        self._set_ready(False)
        self._event("killed")

    def _kill_members(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def freeze(self) -> None:
        (self.cgroup("freezer") / "freezer.state").write_text("FROZEN")
        self._event("frozen")

    def thaw(self) -> None:
        (self.cgroup("freezer") / "freezer.state").write_text("THAWED")
        self._event("thawed")

    def frozen(self) -> bool:
        try:
            return (self.cgroup("freezer") / "freezer.state").read_text().strip() != "THAWED"
        except OSError:
            return False

    def oom_kills(self) -> int:
        """Processes of this pod the kernel's OOM killer killed so far (its memory cgroup's
        ``oom_kill`` count: an OOMKilled container, in Kubernetes' words)."""
        text = (self.cgroup("memory") / "memory.oom_control").read_text()
        counts = dict(line.split(maxsplit=1) for line in text.splitlines() if " " in line)
        return int(counts.get("oom_kill", "0"))

    def memory_rss(self) -> int:
        """Resident memory of the pod's processes now, in bytes (its cgroup's ``total_rss``:
        what counts against the limit once the page cache is reclaimed)."""
        for line in (self.cgroup("memory") / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "total_rss":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        """Every process in the pod's cgroup right now (exec'd commands included)."""
        try:
            text = (self.cgroup("pids") / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def remove(self) -> None:
        """Kill what runs, then delete the namespace, cgroups and the pod's directory."""
        self._gone.set()
        if self.pids() or self._running is not None:
            with contextlib.suppress(OSError):
                self.thaw()
            self.kill()
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self._running = None
        self.network.detach(self.name)
        for controller in CONTROLLERS:
            with contextlib.suppress(FileNotFoundError):
                self.cgroup(controller).rmdir()
        remove_tree(self.pod_dir)

    def tail(self, container: str | None = None, lines: int = 30) -> str:
        try:
            text = self.log_file(container).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def remove_tree(path: Path) -> None:
    """rm -r that also works on what a container left read-only or owned by its user."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def remove_run_cgroups(run_id: str) -> list[Path]:
    """Delete this run's (empty) cgroup folders; returns those that could not be removed."""
    left = []
    for controller in CONTROLLERS:
        base = run_cgroup(controller, run_id)
        if not base.exists():
            continue
        for child in sorted(base.iterdir(), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        try:
            base.rmdir()
        except OSError:
            left.append(base)
        with contextlib.suppress(OSError):
            base.parent.rmdir()  # "localcluster", if no other run uses it
    return left
