"""A small internet in Linux network namespaces: a public host, a NAT router, private hosts behind it.

::

    public 11.77.0.1 ── 11.77.0.2 router     10.77.1.1 ── 10.77.1.2 private 1
                                               10.77.2.1 ── 10.77.2.2 private 2 ...

The router forwards only from a private subnet to the public one, masquerading the sender behind 11.77.0.2;
connection tracking lets the answers back. Nothing can open a connection from the public side into a private one
(the public host has no route there, and the router would drop it) nor from one private subnet into another: each
private host is behind a NAT of its own, as two volunteers at home are. Traffic never leaves the namespaces.

``nat(privates)`` builds it and removes every namespace (and with them their veth pairs) on the way out, even when the
block raised; processes started in a namespace must be stopped before. Run a command in one with ``Nat.enter(name)``
(``ip netns exec NAME ...``). ``unavailable()`` says in one line why it cannot be built here (not root, no ``ip``,
no ``nft`` or ``iptables``), for ``pytest.skip``. Needs root; the NAT rules use ``nft``, else ``iptables``, found on
PATH or unpacked in ``.tools/nftables`` (``apt-get download nftables`` and its libraries, ``dpkg -x``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# A public (globally routable) address on purpose: libp2p drops documentation ranges (TEST-NET 198.51.100.0/24 and
# the like) as unroutable, and peers then cannot find each other ("routing: not found"). Nothing leaves the namespaces.
PUBLIC_IP = "11.77.0.1"
ROUTER_IP = "11.77.0.2"
TOOLS = Path(__file__).resolve().parents[1] / ".tools" / "nftables"
_runs = itertools.count()


@dataclass
class Nat:
    """Namespace names and addresses of one built topology."""

    public: str
    router: str
    private: list[str]
    private_ips: list[str]
    public_ip: str = PUBLIC_IP
    router_ip: str = ROUTER_IP

    @staticmethod
    def enter(namespace: str) -> list[str]:
        """The prefix that runs a command inside ``namespace``."""
        return ["ip", "netns", "exec", namespace]


def _nft() -> tuple[list[str], dict[str, str]] | None:
    """How to run ``nft``: from PATH, or unpacked under ``.tools/nftables`` with its libraries beside it."""
    if found := shutil.which("nft"):
        return [found], {}
    unpacked = TOOLS / "usr" / "sbin" / "nft"
    if unpacked.is_file():
        libraries = [str(path) for path in (TOOLS / "usr" / "lib").glob("*-linux-gnu")]
        return [str(unpacked)], {"LD_LIBRARY_PATH": os.pathsep.join(libraries)}
    return None


def unavailable() -> str | None:
    """Why namespaces with NAT cannot be built here, in one line; None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2)"
    if _nft() is None and shutil.which("iptables") is None:
        return "neither nft nor iptables found (apt-get install nftables, or unpack it into .tools/nftables)"
    probe = f"vp{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*command: str, stdin: str | None = None, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=30
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")


def _masquerade(router: str, public_link: str, private_links: list[str]) -> None:
    """In ``router``: forward private → public only (and the answers back), masquerading the private senders."""
    nft = _nft()
    if nft is not None:
        command, env = nft
        accepted = ", ".join(f'"{link}"' for link in private_links)
        rules = f"""
        table ip vitpeer_nat {{
            chain postrouting {{ type nat hook postrouting priority srcnat; oifname "{public_link}" masquerade; }}
            chain forward {{
                type filter hook forward priority filter; policy drop;
                ct state established,related accept
                iifname {{ {accepted} }} oifname "{public_link}" accept
            }}
        }}
        """
        _run(*Nat.enter(router), *command, "-f", "-", stdin=rules, env=env)
        return
    iptables = [*Nat.enter(router), "iptables"]
    _run(*iptables, "-t", "nat", "-A", "POSTROUTING", "-o", public_link, "-j", "MASQUERADE")
    _run(*iptables, "-P", "FORWARD", "DROP")
    _run(*iptables, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
    for link in private_links:
        _run(*iptables, "-A", "FORWARD", "-i", link, "-o", public_link, "-j", "ACCEPT")


def _link(name_a: str, ns_a: str, ip_a: str, name_b: str, ns_b: str, ip_b: str) -> None:
    """A veth pair: ``name_a`` with ``ip_a``/24 in ``ns_a``, ``name_b`` with ``ip_b``/24 in ``ns_b``, both up."""
    _run("ip", "link", "add", name_a, "type", "veth", "peer", "name", name_b)
    for name, namespace, ip in ((name_a, ns_a, ip_a), (name_b, ns_b, ip_b)):
        _run("ip", "link", "set", name, "netns", namespace)
        _run("ip", "-n", namespace, "addr", "add", f"{ip}/24", "dev", name)
        _run("ip", "-n", namespace, "link", "set", name, "up")


@contextmanager
def nat(privates: int = 1) -> Iterator[Nat]:
    """Build the topology with ``privates`` private hosts, each behind the router's NAT; remove it all afterwards."""
    base = f"vp{os.getpid()}{next(_runs)}"  # unique per process and per call; veth names stay under 16 characters
    topology = Nat(f"{base}-pub", f"{base}-rtr", [f"{base}-pv{i}" for i in range(1, privates + 1)], [])
    namespaces = [topology.public, topology.router, *topology.private]
    links = [f"{base}pa", f"{base}pb"] + [f"{base}{i}{side}" for i in range(1, privates + 1) for side in "ab"]
    try:
        for namespace in namespaces:
            _run("ip", "netns", "add", namespace)
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
        _link(f"{base}pa", topology.public, PUBLIC_IP, f"{base}pb", topology.router, ROUTER_IP)
        for i, namespace in enumerate(topology.private, start=1):
            gateway, host = f"10.77.{i}.1", f"10.77.{i}.2"
            _link(f"{base}{i}a", topology.router, gateway, f"{base}{i}b", namespace, host)
            _run("ip", "-n", namespace, "route", "add", "default", "via", gateway)
            topology.private_ips.append(host)
        _run(*Nat.enter(topology.router), "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _masquerade(topology.router, f"{base}pb", [f"{base}{i}a" for i in range(1, privates + 1)])
        yield topology
    finally:
        for namespace in namespaces:  # what still runs inside (`ip netns exec` forks: killing it orphans its child)
            found = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in found:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for namespace in namespaces:  # removing a namespace removes the veth ends inside it, and with them the pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        for link in links:  # a pair created but not yet moved into its namespace lives here
            subprocess.run(["ip", "link", "del", link], capture_output=True)
