"""Several hosts on one machine: Linux network namespaces on a bridge, and a TCP forwarder.

``Network`` makes a bridge in the root namespace (the "host side", which keeps an address on it)
and a namespace per host, joined to the bridge by a veth pair, each with one address on the
bridge's /24. A process started with ``Host.command(argv)`` (``ip netns exec``) sees only its
host's interfaces: the bridge, and a loopback of its own (up, as on any host: pika's I/O loop
needs one), where none of the machine's servers listen, so anything that assumes a local server
on 127.0.0.1 fails at once instead of quietly reaching the machine's own.

Names carry the test process's id (``ps-<pid>-web1``; the bridge and veths ``ps<pid>…``, within
the kernel's 15 characters), so runs side by side never meet; ``close`` deletes everything it
made, and ``Network`` also removes the leftovers of runs whose process is gone (a killed test).

``TcpForwarder`` relays a port of the host side's bridge address to a server the test process
reaches (the test Postgres, RabbitMQ): the hosts then reach those servers over the bridge, as
they would reach a database host, while the server sees a local client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

IP = "ip"
SUBNETS = ipaddress.IPv4Network("10.213.0.0/16")
STALE = re.compile(r"^ps-(\d+)-")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which(IP) is None:
        return "network namespaces need `ip` (iproute2)"
    return None


class NetworkError(Exception):
    """An ``ip`` command failed; the message holds the command and what it said."""


def _ip(*args: str) -> None:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete the namespaces and bridges of earlier runs whose test process is gone."""
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = STALE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(NetworkError):
                _ip("netns", "delete", name)
    links = subprocess.run(
        [IP, "-o", "link", "show", "type", "bridge"], capture_output=True, text=True, timeout=30
    )
    for found in re.finditer(r"^\d+: (ps(\d+)b):", links.stdout, re.MULTILINE):
        if not _pid_alive(int(found.group(2))):
            with contextlib.suppress(NetworkError):
                _ip("link", "delete", found.group(1))


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of ``SUBNETS`` no interface of the root namespace uses (other runs' bridges)."""
    shown = subprocess.run([IP, "-4", "-o", "addr"], capture_output=True, text=True, timeout=30)
    used = {ipaddress.IPv4Interface(m).network for m in re.findall(r"inet (\S+)", shown.stdout)}
    subnets = list(SUBNETS.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for n in range(len(subnets)):
        subnet = subnets[(start + n) % len(subnets)]
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise NetworkError(f"no free /24 left in {SUBNETS}")


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run on this host."""
        return [IP, "netns", "exec", self.namespace, *argv]


@dataclass
class Network:
    """A bridge with an address of the host side, and hosts added with ``add``."""

    tag: str = field(default_factory=lambda: str(os.getpid()))
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network | None = None
    _bridge: str | None = None

    @property
    def address(self) -> str:
        """The host side's address on the bridge (where forwarders listen)."""
        if self.subnet is None:
            raise NetworkError("Network.create() first")
        return str(self.subnet.network_address + 1)

    def create(self) -> None:
        remove_stale()
        self.subnet = _free_subnet()
        bridge = f"ps{self.tag}b"
        _ip("link", "add", bridge, "type", "bridge")
        self._bridge = bridge
        _ip("addr", "add", f"{self.address}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")

    def add(self, name: str) -> Host:
        """A new host on the bridge, at the next address."""
        if self.subnet is None or self._bridge is None:
            raise NetworkError("Network.create() first")
        n = len(self.hosts) + 1
        host = Host(name, f"ps-{self.tag}-{name}", str(self.subnet.network_address + 10 + n))
        outside, inside = f"ps{self.tag}v{n}", f"ps{self.tag}p{n}"
        _ip("netns", "add", host.namespace)
        self.hosts[name] = host
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", host.namespace)
        _ip("link", "set", outside, "master", self._bridge, "up")
        _ip("-n", host.namespace, "link", "set", inside, "name", "eth0")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Delete every namespace (and so its veth) and the bridge; stop the processes first."""
        for host in self.hosts.values():
            with contextlib.suppress(NetworkError):
                _ip("netns", "delete", host.namespace)
        self.hosts.clear()
        if self._bridge is not None:
            with contextlib.suppress(NetworkError):
                _ip("link", "delete", self._bridge)
            self._bridge = None


class TcpForwarder:
    """Relays connections to ``listen_host`` (a free port) to ``target``, in a process of its
    own: in the test's process, its round trips would wait on the test's own work (the GIL)."""

    def __init__(self, listen_host: str, target_host: str, target_port: int) -> None:
        self.listen_host = listen_host
        self.target = (target_host, target_port)
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "tests.support.netns",
            self.listen_host,
            *map(str, self.target),
        ]
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,  # closed when this process ends, however: the forwarder too
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # the port, once it listens
        if not line.strip().isdigit():
            self.close()
            raise NetworkError(f"the forwarder to {self.target} did not start")
        self.port = int(line)

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()  # the open connections end with it
            self._process.wait(10)
        if self._process is not None:
            for pipe in (self._process.stdin, self._process.stdout):
                if pipe is not None:
                    pipe.close()


async def forward(listen_host: str, target_host: str, target_port: int) -> None:
    """Relay every connection to ``listen_host`` (a free port, printed) to the target."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_writer: asyncio.StreamWriter | None = None

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()  # a half-close passes on: the answer may still come

        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except (ConnectionError, OSError):
            pass  # either side gone: both are closed below
        finally:
            writer.transport.abort()
            if up_writer is not None:
                up_writer.transport.abort()

    server = await asyncio.start_server(relay, listen_host, 0, backlog=512)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def _exit_with_parent() -> None:
    sys.stdin.read()  # EOF: the test process is gone
    os._exit(0)


if __name__ == "__main__":
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    asyncio.run(forward(sys.argv[1], sys.argv[2], int(sys.argv[3])))
