"""A real N-node RabbitMQ cluster on 127.0.0.1, configured by ``components.rabbitmq_conf``.

Used by the integration tests, ``make local`` and the benchmark.  It runs the OS
package (Debian's ``rabbitmq-server``) as the calling user: the nodes are started
with ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (``/usr/sbin/rabbitmq-server``
switches to the ``rabbitmq`` user when run as root).

Isolation, so two clusters (two concurrent test runs, a test run and ``make local``)
never collide and cleanup never touches anybody else's processes:

* everything lives under one base directory: config, ``enabled_plugins``, feature
  flags file, mnesia, logs, the Erlang cookie (``$HOME/.erlang.cookie`` with
  ``HOME`` pointing inside the base directory) and the definitions file;
* every port (AMQP, Erlang distribution, management, prometheus, epmd) is chosen
  free at runtime;
* the cluster runs its own ``epmd`` on its own port (``ERL_EPMD_PORT``), started by
  us as a tracked child; every ``erl`` started with our environment (nodes, CLI,
  the "epmd-starter" RabbitMQ's prelaunch runs) gets ``-start_epmd false``
  (``ERL_FLAGS``), so Erlang never daemonizes an untracked epmd;
* each node is started in a new session (``start_new_session=True``) under a tiny
  reaper process (``_REAPER``: a child subreaper that forwards SIGTERM and reaps
  every descendant).  Erlang's helpers leave the node's process group
  (``erl_child_setup`` calls ``setsid()``, ``inet_gethost`` double-forks), so a
  node is killed by PID: its process group plus every process carrying the node's
  environment marker (``LOCALCLUSTER_RABBIT_ID`` / ``LOCALCLUSTER_RABBIT_NODE``,
  inherited by every descendant).  The reaper collects them, so nothing is left as a
  zombie of PID 1 (which, in some containers and micro-VMs, reaps late or never).
  CLI calls run the same way.  :meth:`LocalRabbitCluster.pids` lists every live
  process carrying the cluster's marker.

Configuration: ``rabbitmq.conf`` is exactly
``rabbitmq_conf(version, LocalDiscovery(...), ...)``.  The default-user snippet
(``default_user_conf``, a Secret on Kubernetes) goes into a ``conf.d`` directory
named by ``RABBITMQ_CONFIG_FILES``, as a Secret-mounted file would; the
definitions (``definitions_json``, including the user: a node importing definitions
at boot does not seed ``default_user``) are a separate file.  Environment variables
only carry paths, ports and the node name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from components.rabbitmq_conf import (
    LocalDiscovery,
    default_user_conf,
    definitions_json,
    enabled_plugins,
    parse_version,
    rabbitmq_conf,
)
from localcluster.sockets import connected_nodes

__all__ = [
    "INSTALL_COMMAND",
    "ClusterError",
    "LocalRabbitCluster",
    "RabbitMQNotInstalledError",
    "installed_version",
    "marked_pids",
]

log = logging.getLogger(__name__)

DEFAULT_RABBITMQ_HOME = Path("/usr/lib/rabbitmq")
PACKAGE = "rabbitmq-server"
INSTALL_COMMAND = f"apt-get install -y {PACKAGE}"
#: Environment markers carried by every process a cluster starts: the cluster id,
#: and for a node's processes the node name.  Inherited by every descendant, even
#: those that leave the process group (Erlang's erl_child_setup calls setsid()).
MARKER_ENV = "LOCALCLUSTER_RABBIT_ID"
NODE_MARKER_ENV = "LOCALCLUSTER_RABBIT_NODE"

# A tiny init for each node and CLI call.  It becomes a child subreaper (Linux
# PR_SET_CHILD_SUBREAPER), runs the command, forwards SIGTERM/SIGINT/SIGHUP to it
# and reaps every descendant until none is left, then exits with the command's
# status.  Erlang's helpers (erl_child_setup, inet_gethost) leave the process group
# and double-fork; without this they end up as zombies of PID 1, which on some
# machines (containers, micro-VMs) reaps late or never.
_REAPER = r"""
import ctypes, os, signal, subprocess, sys
try:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
child = subprocess.Popen(sys.argv[1:])
def forward(signum, frame):
    try:
        os.kill(child.pid, signum)
    except ProcessLookupError:
        pass
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, forward)
status = 1
while True:
    try:
        pid, raw = os.wait()
    except ChildProcessError:
        break
    if pid == child.pid:
        child.returncode = status = os.waitstatus_to_exitcode(raw)
sys.exit(status if status >= 0 else 128 - status)
"""


class RabbitMQNotInstalledError(RuntimeError):
    """The RabbitMQ server (Debian package ``rabbitmq-server``) is not installed."""


class ClusterError(RuntimeError):
    """A node did not start, did not cluster, or a CLI call failed."""


def _not_installed(detail: str) -> RabbitMQNotInstalledError:
    return RabbitMQNotInstalledError(
        f"RabbitMQ is not installed here ({detail}). The local cluster runs the Debian/Ubuntu "
        f"package '{PACKAGE}' (it brings Erlang and epmd); install it as root with:\n"
        f"    {INSTALL_COMMAND}"
    )


def installed_version(rabbitmq_home: Path = DEFAULT_RABBITMQ_HOME) -> str:
    """Version of the installed RabbitMQ server, e.g. ``"3.10.8-1.1+deb12u1"``."""
    if shutil.which("dpkg-query"):
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    # Not a dpkg system (or not installed through dpkg): the release directory name.
    releases = sorted((rabbitmq_home / "lib").glob("rabbitmq_server-*"))
    if releases:
        return releases[-1].name.removeprefix("rabbitmq_server-")
    raise _not_installed(f"no '{PACKAGE}' package and no {rabbitmq_home}/lib/rabbitmq_server-*")


def _reap(pids: set[int]) -> None:
    """Collect exit statuses of the given pids if they are (now) our children."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split(" ")
    return fields[0], int(fields[1])


def marked_pids(cluster_id: str, node: str | None = None) -> set[int]:
    """Live processes whose environment carries this cluster's marker (and node's)."""
    needles = [f"{MARKER_ENV}={cluster_id}".encode()]
    if node is not None:
        needles.append(f"{NODE_MARKER_ENV}={node}".encode())
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(needle in environ for needle in needles) and _alive(int(entry.name)):
            found.add(int(entry.name))
    return found


def _descendants(root: int) -> set[int]:
    """``root`` and every live process below it (by parent pid), right now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(entry.name)) is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return {p for p in found if _alive(p)}


def _kill_and_reap(members: set[int], timeout: float = 10) -> set[int]:
    """SIGKILL every pid, reap those that are (or become) our children.

    Returns the pids still present after ``timeout`` (zombies whose parent is not
    us count as gone: they are dead, their parent or PID 1 collects them).
    """
    me = os.getpid()
    for pid in members:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        _reap(members)
        present = set()
        for pid in members:
            st = _stat(pid)
            if st is None or st[0] == "X" or (st[0] == "Z" and st[1] != me):
                continue
            present.add(pid)
        if not present or time.monotonic() > deadline:
            return present
        time.sleep(0.05)


def _reaped(*cmd: str) -> list[str]:
    """``cmd`` run under the reaper (see ``_REAPER``)."""
    return [sys.executable, "-I", "-c", _REAPER, *cmd]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open until all are picked)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Node:
    index: int
    name: str
    amqp_port: int
    dist_port: int
    management_port: int
    prometheus_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None  # the reaper running rabbitmq-server

    @property
    def stdout_log(self) -> Path:
        return self.directory / "stdout.log"

    @property
    def config_file(self) -> Path:
        return self.directory / "rabbitmq.conf"

    @property
    def conf_d(self) -> Path:
        return self.directory / "conf.d"


class LocalRabbitCluster:
    """An N-node RabbitMQ cluster on 127.0.0.1 (see the module docstring).

    >>> with LocalRabbitCluster(size=3) as cluster:   # doctest: +SKIP
    ...     cluster.start()
    ...     urls = cluster.broker_urls()
    """

    def __init__(
        self,
        size: int = 3,
        base_dir: Path | None = None,
        username: str = "celery",
        password: str | None = None,
        vhost: str = "celery",
        delivery_limit: int = 5,
        version: str | None = None,
        *,
        disk_free_limit: str = "50MB",
        rabbitmq_home: Path = DEFAULT_RABBITMQ_HOME,
        own_dist_source_addresses: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self.size = size
        self.username = username
        self.password = password if password is not None else secrets.token_urlsafe(18)
        self.vhost = vhost
        self.delivery_limit = delivery_limit
        self.disk_free_limit = disk_free_limit
        self.rabbitmq_home = Path(rabbitmq_home)
        self._version = version
        self.cluster_id = uuid.uuid4().hex[:12]
        self._own_base_dir = base_dir is None
        self.base_dir: Path | None = None if base_dir is None else Path(base_dir)
        self.node_names = [f"rmq{i}@localhost" for i in range(size)]
        #: With ``own_dist_source_addresses``, node i opens its Erlang distribution
        #: connections from its own loopback address (127.A.B.10+i, A.B random per
        #: cluster), so a firewall rule can tell which node a connection comes from
        #: and cut one node off from the others (``localcluster.partition``).
        #: Every node still listens, and is reached, on 127.0.0.1.
        self.dist_source_addresses: list[str] = []
        if own_dist_source_addresses:
            a, b = (1 + secrets.randbelow(254) for _ in range(2))
            self.dist_source_addresses = [f"127.{a}.{b}.{10 + i}" for i in range(size)]
        self.amqp_ports: list[int] = []
        self.epmd_port = 0
        self._nodes: list[_Node] = []
        self._epmd: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._prepared = False
        self.timings: dict[str, float] = {}
        # Nodes started again after crashing while booting with their peers.
        self.boot_restarts = 0

    # ------------------------------------------------------------------ properties
    @property
    def version(self) -> str:
        """RabbitMQ version the config is rendered for (auto-detected from dpkg-query)."""
        if self._version is None:
            self._version = installed_version(self.rabbitmq_home)
        return self._version

    @property
    def dist_ports(self) -> list[int]:
        """Erlang distribution listener port of each node (on 127.0.0.1)."""
        return [n.dist_port for n in self._nodes]

    @property
    def management_ports(self) -> list[int]:
        return [n.management_port for n in self._nodes]

    @property
    def prometheus_ports(self) -> list[int]:
        return [n.prometheus_port for n in self._nodes]

    def broker_urls(self) -> list[str]:
        """One ``amqp://user:pass@127.0.0.1:PORT/vhost`` URL per node."""
        self._require_prepared()
        user = quote(self.username, safe="")
        password = quote(self.password, safe="")
        vhost = quote(self.vhost, safe="")
        return [f"amqp://{user}:{password}@127.0.0.1:{port}/{vhost}" for port in self.amqp_ports]

    # --------------------------------------------------------------------- files
    def _check_installed(self) -> None:
        server = self.rabbitmq_home / "bin" / "rabbitmq-server"
        if not server.exists():
            raise _not_installed(f"{server} not found")
        if shutil.which("epmd") is None:
            raise _not_installed("'epmd' (Erlang) not on PATH")

    def _prepare(self) -> None:
        """Pick ports, render and write every file. No process is started."""
        if self._prepared:
            return
        self._check_installed()
        parse_version(self.version)  # fail early with the value in the message
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"localrabbit-{self.cluster_id}-"))
        base = self.base_dir
        base.mkdir(parents=True, exist_ok=True)
        home = base / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(24))
        cookie.chmod(0o400)

        ports = _free_ports(1 + 4 * self.size)
        self.epmd_port = ports[0]
        discovery = LocalDiscovery(tuple(self.node_names))
        definitions = base / "definitions.json"
        definitions.write_text(
            definitions_json(
                self.vhost,
                delivery_limit=self.delivery_limit,
                username=self.username,
                password=self.password,
                version=self.version,
            )
        )
        definitions.chmod(0o600)
        self._nodes = []
        for i, name in enumerate(self.node_names):
            amqp, dist, mgmt, prom = ports[1 + 4 * i : 5 + 4 * i]
            node = _Node(i, name, amqp, dist, mgmt, prom, base / f"rmq{i}")
            node.directory.mkdir(exist_ok=True)
            node.conf_d.mkdir(exist_ok=True)
            node.config_file.write_text(
                rabbitmq_conf(
                    self.version,
                    discovery,
                    amqp_port=amqp,
                    management_port=mgmt,
                    prometheus_port=prom,
                    disk_free_limit=self.disk_free_limit,
                    definitions_path=str(definitions),
                )
            )
            user_conf = node.conf_d / "10-default-user.conf"
            user_conf.write_text(default_user_conf(self.username, self.password, self.vhost))
            user_conf.chmod(0o600)
            (node.directory / "enabled_plugins").write_text(enabled_plugins(discovery))
            self._nodes.append(node)
        self.amqp_ports = [n.amqp_port for n in self._nodes]
        self._prepared = True
        log.info(
            "local RabbitMQ %s cluster %s: %d nodes in %s (epmd port %d, amqp ports %s)",
            self.version,
            self.cluster_id,
            self.size,
            base,
            self.epmd_port,
            self.amqp_ports,
        )

    def _require_prepared(self) -> None:
        if not self._prepared:
            raise ClusterError("cluster not started: call start() first")

    # ----------------------------------------------------------------- processes
    def _base_env(self) -> dict[str, str]:
        assert self.base_dir is not None
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            {
                MARKER_ENV: self.cluster_id,
                "HOME": str(self.base_dir / "home"),  # .erlang.cookie lives here
                "ERL_EPMD_PORT": str(self.epmd_port),
                # Do not read /etc/rabbitmq/rabbitmq-env.conf (not a regular file).
                "RABBITMQ_CONF_ENV_FILE": "/dev/null",
                # CLI tools: any free port for their distribution listener, instead of
                # the shared default range 35672-35682.
                "RABBITMQ_CTL_DIST_PORT_MIN": "0",
                "RABBITMQ_CTL_DIST_PORT_MAX": "0",
                # No erl started with our environment may daemonize an epmd of its own
                # (rabbit's prelaunch runs an "epmd-starter" erl): ours is running.
                "ERL_FLAGS": "-start_epmd false",
                "LC_ALL": "C.UTF-8",
            }
        )
        return env

    def _node_env(self, node: _Node) -> dict[str, str]:
        assert self.base_dir is not None
        env = self._base_env()
        env.update(
            {
                NODE_MARKER_ENV: node.name,
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_CONFIG_FILE": str(node.config_file),
                "RABBITMQ_CONFIG_FILES": str(node.conf_d),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.directory / "enabled_plugins"),
                "RABBITMQ_FEATURE_FLAGS_FILE": str(node.directory / "feature_flags"),
                "RABBITMQ_MNESIA_BASE": str(node.directory / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.directory / "log"),
                "RABBITMQ_PID_FILE": str(node.directory / "rabbitmq.pid"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(node.directory / "plugins-expand"),
                # Our epmd only; distribution bound to loopback.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
                ),
            }
        )
        if self.dist_source_addresses:
            ip = self.dist_source_addresses[node.index].replace(".", ",")
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] += (
                f" -kernel inet_dist_connect_options [{{ip,{{{ip}}}}}]"
            )
        return env

    def _start_epmd(self) -> None:
        assert self.base_dir is not None
        epmd = shutil.which("epmd")
        if epmd is None:
            raise _not_installed("'epmd' (Erlang) not on PATH")
        with open(self.base_dir / "epmd.log", "ab") as out:
            self._epmd = subprocess.Popen(
                [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=self._base_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not _port_open(self.epmd_port):
            if self._epmd.poll() is not None:
                raise ClusterError(
                    f"epmd exited with {self._epmd.returncode} on port {self.epmd_port}: "
                    + _tail(self.base_dir / "epmd.log")
                )
            if time.monotonic() > deadline:
                raise ClusterError(f"epmd did not listen on 127.0.0.1:{self.epmd_port} in 10 s")
            time.sleep(0.05)
        log.info("epmd pid %d listening on 127.0.0.1:%d", self._epmd.pid, self.epmd_port)

    def _spawn(self, node: _Node) -> None:
        server = self.rabbitmq_home / "bin" / "rabbitmq-server"
        with open(node.stdout_log, "ab") as out:
            node.proc = subprocess.Popen(
                _reaped(str(server)),
                env=self._node_env(node),
                cwd=node.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("started %s (pid %d, amqp %d)", node.name, node.proc.pid, node.amqp_port)

    def _node_failed(self, node: _Node, why: str) -> ClusterError:
        return ClusterError(
            f"{node.name}: {why}\n--- last lines of {node.stdout_log} ---\n{_tail(node.stdout_log)}"
        )

    def _wait_node_ready(self, node: _Node, deadline: float) -> None:
        """Until the node's AMQP listener accepts connections (end of boot)."""
        while True:
            if node.proc is None or node.proc.poll() is not None:
                code = None if node.proc is None else node.proc.returncode
                raise self._node_failed(node, f"exited during boot (exit status {code})")
            if _port_open(node.amqp_port):
                return
            if time.monotonic() > deadline:
                raise self._node_failed(node, f"AMQP port {node.amqp_port} not open in time")
            time.sleep(0.2)

    def _wait_node_ready_restarting(self, node: _Node, deadline: float, attempts: int = 3) -> None:
        """Like _wait_node_ready, but start a node again if it crashes during boot.

        When all nodes boot at once, RabbitMQ 3.10 can crash one of them while it
        syncs feature flags with a peer that is itself still booting
        (``incompatible_feature_flags``, ``{badmap,undefined}``; seen here about one
        whole-cluster restart in ten). On Kubernetes the kubelet restarts such a
        container; this does the same, a bounded number of times.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._wait_node_ready(node, deadline)
                return
            except ClusterError:
                exited = node.proc is not None and node.proc.poll() is not None
                if not exited or attempt == attempts or time.monotonic() > deadline:
                    raise
                log.warning(
                    "%s crashed while booting with its peers (attempt %d of %d); starting it again",
                    node.name,
                    attempt,
                    attempts,
                )
                self.boot_restarts += 1
                self._kill_node_processes(node)
                self._spawn(node)

    # ----------------------------------------------------------------------- API
    def start(self, timeout: float = 120) -> None:
        """Boot all nodes in parallel; return when all ``size`` are running and clustered."""
        with self._lock:
            if self._closed:
                raise ClusterError("cluster already closed")
            t0 = time.monotonic()
            deadline = t0 + timeout
            try:
                self._prepare()
                self._start_epmd()
                for node in self._nodes:
                    self._spawn(node)
                for node in self._nodes:
                    # The first boot is all nodes at once too (the 3.10 race above).
                    self._wait_node_ready_restarting(node, deadline)
                self.timings["boot"] = time.monotonic() - t0
                log.info("all %d nodes accept AMQP after %.1f s", self.size, self.timings["boot"])
                self.wait_clustered(timeout=max(1.0, deadline - time.monotonic()))
                self.timings["clustered"] = time.monotonic() - t0
            except BaseException:
                log.error("start failed; stopping every process of cluster %s", self.cluster_id)
                self._kill_everything()
                raise
            log.info(
                "cluster %s ready: %d nodes clustered after %.1f s (boot %.1f s)",
                self.cluster_id,
                self.size,
                self.timings["clustered"],
                self.timings["boot"],
            )

    def cluster_status(self, i: int = 0) -> dict[str, object]:
        """``rabbitmqctl cluster_status`` of node i, parsed from JSON."""
        result = json.loads(self.rabbitmqctl(i, "cluster_status", "--formatter", "json"))
        if not isinstance(result, dict):
            raise ClusterError(f"unexpected cluster_status output: {result!r}")
        return result

    def running_nodes(self, i: int = 0) -> list[str]:
        nodes = self.cluster_status(i).get("running_nodes", [])
        return sorted(str(n) for n in nodes) if isinstance(nodes, list) else []

    def wait_clustered(self, timeout: float = 60, nodes: list[int] | None = None) -> None:
        """Until every node in ``nodes`` (default: all) sees all ``size`` nodes running."""
        self._require_prepared()
        indices = list(range(self.size)) if nodes is None else nodes
        expected = sorted(self.node_names)
        deadline = time.monotonic() + timeout
        last: object = None
        pending = list(indices)
        while pending:
            i = pending[0]
            node = self._nodes[i]
            if node.proc is None or node.proc.poll() is not None:
                raise self._node_failed(node, "is not running")
            try:
                last = self.running_nodes(i)
                if last == expected:
                    pending.pop(0)
                    continue
            except ClusterError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{node.name} does not see all {self.size} nodes running after "
                    f"{timeout:.0f} s; last answer: {last}"
                )
            time.sleep(0.5)
        log.info("clustered: %s", ", ".join(expected))

    def _cli(self, tool: str, i: int, args: tuple[str, ...], timeout: float) -> str:
        self._require_prepared()
        node = self._nodes[i]
        cmd = [str(self.rabbitmq_home / "bin" / tool), "-n", node.name, *args]
        proc = subprocess.Popen(
            _reaped(*cmd),
            env=self._base_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_and_reap(_descendants(proc.pid) - {proc.pid})  # the reaper reaps them
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            _kill_and_reap(_descendants(proc.pid))
            raise ClusterError(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd)} failed with exit status {proc.returncode}:\n"
                f"{err.decode(errors='replace')}{out.decode(errors='replace')}"
            )
        return out.decode(errors="replace")

    def rabbitmqctl(self, i: int, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node i> ARGS`` with this cluster's cookie and epmd."""
        return self._cli("rabbitmqctl", i, args, timeout)

    def rabbitmq_diagnostics(self, i: int, *args: str, timeout: float = 60) -> str:
        return self._cli("rabbitmq-diagnostics", i, args, timeout)

    def rabbitmq_queues(self, i: int, *args: str, timeout: float = 60) -> str:
        return self._cli("rabbitmq-queues", i, args, timeout)

    def node_pids(self, i: int) -> set[int]:
        """Live processes of node i: sh wrapper, beam.smp, erl_child_setup, port programs."""
        node = self._nodes[i]
        found = marked_pids(self.cluster_id, node.name)
        if node.proc is not None and node.proc.poll() is None:
            found |= _descendants(node.proc.pid)
        return found

    def is_running(self, i: int) -> bool:
        node = self._nodes[i]
        return node.proc is not None and node.proc.poll() is None

    def start_node(self, i: int, timeout: float = 90) -> None:
        """(Re)start node i with its existing data; wait until it has rejoined."""
        with self._lock:
            self._require_prepared()
            node = self._nodes[i]
            if self.is_running(i):
                raise ClusterError(f"{node.name} is already running")
            t0 = time.monotonic()
            self._spawn(node)
            self._wait_node_ready(node, t0 + timeout)
            self.wait_clustered(timeout=max(1.0, t0 + timeout - time.monotonic()))
            log.info("%s back and clustered after %.1f s", node.name, time.monotonic() - t0)

    def start_nodes(self, indices: list[int] | None = None, timeout: float = 120) -> None:
        """(Re)start the given stopped nodes (default: all) at once, with their data;
        wait until every node sees all ``size`` running.

        For a whole-cluster restart: RabbitMQ 3.x (Mnesia) makes a node wait for
        the peers that were running when it stopped, and the last node to stop must
        be among the first to start, so restarting them one by one
        (:meth:`start_node` waits for the whole cluster) would wait for ever.
        """
        with self._lock:
            self._require_prepared()
            chosen = list(range(self.size)) if indices is None else list(indices)
            for i in chosen:
                if self.is_running(i):
                    raise ClusterError(f"{self._nodes[i].name} is already running")
            t0 = time.monotonic()
            for i in chosen:
                self._spawn(self._nodes[i])
            for i in chosen:
                self._wait_node_ready_restarting(self._nodes[i], t0 + timeout)
            self.wait_clustered(timeout=max(1.0, t0 + timeout - time.monotonic()))
            log.info("nodes %s back and clustered after %.1f s", chosen, time.monotonic() - t0)

    def stop_nodes(
        self, indices: list[int] | None = None, graceful: bool = True, timeout: float = 60
    ) -> None:
        """Stop the given nodes (default: all) at once: SIGTERM to every one (RabbitMQ's
        graceful shutdown), wait for each, then SIGKILL whatever is left of them."""
        with self._lock:
            self._require_prepared()
            chosen = list(range(self.size)) if indices is None else list(indices)
            nodes = [self._nodes[i] for i in chosen if self._nodes[i].proc is not None]
            if graceful:
                for node in nodes:
                    assert node.proc is not None
                    log.info("stopping %s gracefully (SIGTERM)", node.name)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(node.proc.pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                for node in nodes:
                    assert node.proc is not None
                    try:
                        node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        log.warning("%s ignored SIGTERM for %.0f s; killing it", node.name, timeout)
            for node in nodes:
                self._kill_node_processes(node)

    def stop_node(self, i: int, graceful: bool = True, timeout: float = 60) -> None:
        """Stop node i: SIGTERM (RabbitMQ's graceful shutdown) or SIGKILL."""
        with self._lock:
            self._require_prepared()
            node = self._nodes[i]
            if node.proc is None:
                return
            if graceful and node.proc.poll() is None:
                log.info("stopping %s gracefully (SIGTERM)", node.name)
                # To the reaper, which forwards it to rabbitmq-server, which forwards
                # it to beam.smp: RabbitMQ's own graceful shutdown.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGTERM)
                try:
                    node.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s ignored SIGTERM for %.0f s; killing it", node.name, timeout)
            else:
                log.info("killing %s (SIGKILL)", node.name)
            self._kill_node_processes(node)

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of node i (a crash, not a shutdown)."""
        self.stop_node(i, graceful=False)

    def _kill_node_processes(self, node: _Node) -> None:
        """SIGKILL every process of a node but its reaper, which reaps them and exits."""
        proc = node.proc
        if proc is None:
            return
        members = _descendants(proc.pid) | marked_pids(self.cluster_id, node.name)
        present = _kill_and_reap(members - {proc.pid})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        # The reaper itself if it is stuck, and anything forked meanwhile.
        present |= _kill_and_reap(marked_pids(self.cluster_id, node.name) | {proc.pid})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        node.proc = None
        if present:
            raise ClusterError(f"{node.name}: processes survived SIGKILL: {sorted(present)}")

    def connected_nodes(self, pid: int) -> list[int]:
        """The nodes process ``pid`` has AMQP connections to, most first."""
        return connected_nodes(pid, self.amqp_ports)

    def live_pids(self) -> set[int]:
        """Every live process carrying this cluster's marker."""
        return marked_pids(self.cluster_id)

    def pids(self) -> list[int]:
        """Every live OS process this cluster started and still has."""
        if not self._prepared:
            return []
        found = marked_pids(self.cluster_id)
        for node in self._nodes:
            if node.proc is not None and node.proc.poll() is None:
                found |= _descendants(node.proc.pid)
        if self._epmd is not None and self._epmd.poll() is None:
            found |= _descendants(self._epmd.pid)
        return sorted(p for p in found if _alive(p))

    def _kill_everything(self) -> None:
        """SIGKILL every process of the cluster at once, reap, verify."""
        # All nodes at once (a node whose peers vanish one by one would pause
        # itself); not the reapers, which collect their node's processes and exit.
        reapers = {n.proc.pid: n.proc for n in self._nodes if n.proc is not None}
        members: set[int] = set()
        for pid in reapers:
            members |= _descendants(pid)
        if self._prepared:
            members |= marked_pids(self.cluster_id)  # CLI calls in flight, orphans
        epmd = self._epmd
        present = _kill_and_reap(members - set(reapers) - ({epmd.pid} if epmd else set()))
        for proc in reapers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if epmd is not None:  # last: nodes talk to it until they die
            present |= _kill_and_reap({epmd.pid})
            with contextlib.suppress(subprocess.TimeoutExpired):
                epmd.wait(timeout=5)
        for node in self._nodes:
            node.proc = None
        self._epmd = None
        if self._prepared:
            present |= _kill_and_reap(marked_pids(self.cluster_id) | set(reapers))
        present = {p for p in present if _alive(p)}
        if present:
            log.warning("cluster %s: still present after SIGKILL: %s", self.cluster_id, present)

    def close(self, remove_dir: bool | None = None) -> None:
        """Stop every process this cluster started (by process group), verify they are gone.

        Idempotent, and safe after a failed or partial start.  Removes the base
        directory if this object created it (``remove_dir`` overrides).
        """
        with self._lock:
            self._kill_everything()
            leftover = self.pids()
            if leftover:
                raise ClusterError(
                    f"cluster {self.cluster_id}: processes survived close(): {leftover}"
                )
            self._closed = True
            remove = self._own_base_dir if remove_dir is None else remove_dir
            if remove and self.base_dir is not None and self.base_dir.exists():
                shutil.rmtree(self.base_dir, ignore_errors=True)
                log.info("removed %s", self.base_dir)

    def config_file(self, i: int) -> Path:
        """Path of node i's rendered ``rabbitmq.conf``."""
        self._require_prepared()
        return self._nodes[i].config_file

    def logs(self, i: int, lines: int = 60) -> str:
        """Last lines of node i's stdout/stderr log."""
        self._require_prepared()
        return _tail(self._nodes[i].stdout_log, lines)

    def __enter__(self) -> LocalRabbitCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
