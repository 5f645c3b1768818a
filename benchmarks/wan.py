"""WAN: the ``diloco`` and ``gradient`` algorithms between 2 peers on one shaped link (100 Mbit/s, 50 ms round trip).

Each peer is the real ``vitpeer join`` (``python -m benchmarks.wan join ...``, ``ComputeClock`` and ``StepTrace``
added through ``run_join``'s public hook), pinned to a core of its own and run in a network namespace of its own.
The two namespaces are joined by one link that this benchmark makes and removes (``Link``):

    namespace A: wan0 10.213.1.1/24 --tbf 100 Mbit/s--> wire (25 ms) --> wan0 10.213.1.2/24 :namespace B
                                     <--wire (25 ms)-- <--tbf 100 Mbit/s--

This kernel has no ``netem`` (``CONFIG_NET_SCH_NETEM`` is not set; ``tbf`` and ``htb`` are built in), so the delay
is made in user space: ``wan0`` in each namespace is a TUN device, and one small process (``wire``) reads every
packet one side sends and writes it into the other side 25 ms later. The rate is the kernel's ``tbf`` on each
``wan0``, its queue one bandwidth-delay product (625 kB). Nothing the peers send can leave the namespaces: there is
no route out of them, and the TUN devices lead only to each other. ``Link.probe`` measures what the link does (the
round trip of small messages, the throughput of a bulk transfer) and every run reports it, with the CPU time the
wire took from the peers' cores (``wire_cpu_s``).

Figures, for each algorithm:
- utilisation: the lower peer's compute share (``ComputeClock``: forward, backward and the inner optimizer's steps
  over wall time, past its warm-up);
- bytes per trained sample: what both ``wan0`` sent during the run (their ``tx_bytes``: every byte that crossed the
  link, the DHT's and the bootstrap node's included) over the samples the peers trained (``samples_contributed``);
- swarm samples/s: the peers' samples over the longest peer's training time.
``StepTrace`` keeps every local step's times, and for diloco the time the training thread waited and its rounds,
so what limits a figure can be read from the results: each peer's ``waits``, and ``bytes_by_phase`` (start-up,
blocked in a sync or the last round, background rounds, after training), split with ``tx_bytes`` sampled every 0.2 s.

Round sizes. The model is ViT-S/16's width and depth (21.3M parameters) on 16 px digits in 4 px patches, about 40
samples/s on one core. A diloco round is 6400 samples, 100 local steps of 32 per peer (INTELLECT-1's H = 100): about
90 s of compute against a few seconds for its fp16 all-reduce (42.6 MB sent per peer), and, per sample, 1/100 of
what gradient sends at digits_tiny's 256 samples per swarm step (an fp32 gradient round and an fp32 state round per
step). 3 rounds show a round the training hides between the exact syncs of the first and the last step; gradient
trains 8 swarm steps, enough local steps for ``ComputeClock`` to time some past its warm-up. About 10 minutes in all
on 2 cores; ``python -m benchmarks.wan run --help`` changes the sizes, ``--keep DIR`` keeps the peers' folders.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NAMESPACE_PREFIX = "vitpeer-wan-"  # + our pid + "-a" / "-b": stale ones are found by their dead pid
DEVICE = "wan0"
SUBNET = "10.213.1"  # a private /24 inside the namespaces only: they have no route to anything else
RATE_MBIT = 100
ONE_WAY_DELAY_S = 0.025  # each way: 50 ms round trip
MTU = 1500

TUNSETIFF = 0x400454CA  # linux/if_tun.h
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000  # linux/sched.h


# --- the link ----------------------------------------------------------------------------------------------------


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _sweep_stale() -> None:
    """Remove the namespaces of earlier runs whose process is gone (killed with SIGKILL, where no finally ran)."""
    for line in _ip("netns", "list").splitlines():
        found = re.match(rf"{re.escape(NAMESPACE_PREFIX)}(\d+)-[ab]\b", line)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", line.split()[0]], check=False, capture_output=True)


class Link:
    """Two network namespaces joined by one shaped link (see the module's docstring); removed on exit, whatever
    ends the block (an error, Ctrl-C, SIGTERM)."""

    def __init__(self, rate_mbit: float = RATE_MBIT, one_way_delay_s: float = ONE_WAY_DELAY_S, mtu: int = MTU):
        self.rate_mbit, self.one_way_delay_s, self.mtu = rate_mbit, one_way_delay_s, mtu
        self.namespaces = (f"{NAMESPACE_PREFIX}{os.getpid()}-a", f"{NAMESPACE_PREFIX}{os.getpid()}-b")
        self.addresses = (f"{SUBNET}.1", f"{SUBNET}.2")
        self.wire: subprocess.Popen | None = None
        self._counters: list[Any] = []  # each namespace's /proc/net/dev, opened inside it

    def __enter__(self) -> Link:
        _sweep_stale()
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds through our finally blocks
            signal.signal(signal.SIGTERM, _raise_interrupt)
        self._previous_sigterm = previous
        try:
            self._make()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _make(self) -> None:
        for namespace in self.namespaces:
            _ip("netns", "add", namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        self.wire = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.wan", "wire", *self.namespaces, str(self.one_way_delay_s)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.wire.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the wire process did not start (exit code {self.wire.wait()})")
        # tbf: the rate; its queue holds one bandwidth-delay product, as a router's buffer often does
        rate = f"{self.rate_mbit}mbit"
        queue = int(self.rate_mbit * 1e6 / 8 * 2 * self.one_way_delay_s)
        for namespace, address in zip(self.namespaces, self.addresses, strict=True):
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", DEVICE)
            _ip("-n", namespace, "link", "set", DEVICE, "mtu", str(self.mtu), "up")
            shaping = ["qdisc", "add", "dev", DEVICE, "root", "tbf", "rate", rate, "burst", "32kb"]
            subprocess.run(["tc", "-n", namespace, *shaping, "limit", str(queue)], check=True, capture_output=True)
            with _in_namespace(namespace):  # a /proc/net file shows the namespace it was opened in
                self._counters.append(open("/proc/thread-self/net/dev", "rb", buffering=0))

    def __exit__(self, *_: object) -> None:
        for counters in self._counters:
            counters.close()
        if self.wire is not None and self.wire.poll() is None:
            self.wire.stdin.close()  # the wire's signal to stop
            try:
                self.wire.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.wire.kill()
                self.wire.wait()
        for namespace in self.namespaces:  # takes the TUN devices, addresses and queues with it
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def exec(self, side: int) -> list[str]:
        """The command prefix that runs a command in namespace ``side`` (0: A, 1: B)."""
        return ["ip", "netns", "exec", self.namespaces[side]]

    def tx_bytes(self) -> tuple[int, int]:
        """Bytes each side's ``wan0`` has sent since the link was made (cheap: a read of each /proc/net/dev)."""
        sent = []
        for counters in self._counters:
            counters.seek(0)
            for line in counters.read().decode().splitlines():
                name, _, numbers = line.partition(":")
                if name.strip() == DEVICE:
                    sent.append(int(numbers.split()[8]))
        return sent[0], sent[1]

    def cpu_seconds(self) -> float:
        """CPU time the wire process has used so far (it shares the cores with the peers)."""
        fields = Path(f"/proc/{self.wire.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def probe(self, nbytes: int = 12_500_000) -> dict[str, float]:
        """Round trips of small messages (median of 10, ms) and a bulk transfer's rate (Mbit/s, slow start
        included) from A to B, each end in its namespace."""
        server = subprocess.Popen(
            [*self.exec(1), sys.executable, "-m", "benchmarks.wan", "probe-server", self.addresses[1]],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = server.stdout.readline().strip()
            client = [*self.exec(0), sys.executable, "-m", "benchmarks.wan", "probe-client", self.addresses[1], port]
            done = subprocess.run([*client, str(nbytes)], cwd=REPO, check=True, capture_output=True, text=True)
            return json.loads(done.stdout)
        finally:
            server.kill()
            server.wait()


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the cleanup runs."""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(f"signal {signum}")


def link_leftovers(pid: int | None = None) -> list[str]:
    """Namespaces of this benchmark (made by process ``pid``, or by any) that exist now."""
    prefix = NAMESPACE_PREFIX if pid is None else f"{NAMESPACE_PREFIX}{pid}-"
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.startswith(prefix)]


def unavailable() -> str | None:
    """Why this machine cannot make the link, or None: it needs root (namespaces, TUN devices, tc), ip, tc and
    taskset."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices, tc)"
    missing = [tool for tool in ("ip", "tc", "taskset") if shutil.which(tool) is None]
    if missing or not Path("/dev/net/tun").exists():
        return f"needs {', '.join(missing or ['/dev/net/tun'])}"
    return None


# --- the wire: a process that delays every packet between the two TUN devices ------------------------------------


@contextmanager
def _in_namespace(namespace: str) -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot enter network namespace {namespace}")
        yield
    finally:
        libc.setns(here, CLONE_NEWNET)
        os.close(here)
        os.close(there)


def _open_tun(namespace: str) -> int:
    """A TUN device named ``DEVICE`` in ``namespace`` (it lives as long as the returned file descriptor)."""
    with _in_namespace(namespace):  # a TUN device is made in the namespace of the thread that opens it
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def wire(namespace_a: str, namespace_b: str, delay_s: float) -> None:
    """Carry every packet between the two namespaces' TUN devices, each ``delay_s`` after it was sent; until stdin
    closes (the owner's signal) or the owner dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the devices go with us
    fds = (_open_tun(namespace_a), _open_tun(namespace_b))
    bound: tuple[deque, deque] = (deque(), deque())  # (due, packet) for fds[0], for fds[1]
    selector = selectors.DefaultSelector()
    selector.register(fds[0], selectors.EVENT_READ, 1)  # what A sends goes to B
    selector.register(fds[1], selectors.EVENT_READ, 0)
    selector.register(sys.stdin, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        due = [queue[0][0] for queue in bound if queue]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        for key, _ in selector.select(timeout):
            if key.data is None:
                if not sys.stdin.read(1):
                    return
                continue
            arrives = time.monotonic() + delay_s
            while True:
                try:
                    bound[key.data].append((arrives, os.read(key.fd, 65536)))
                except BlockingIOError:
                    break
        now = time.monotonic()
        for fd, queue in zip(fds, bound, strict=True):
            while queue and queue[0][0] <= now:
                try:
                    os.write(fd, queue.popleft()[1])
                except OSError as err:
                    # EIO: that end's device is not up yet (the link is made one side at a time); the packet is
                    # lost, as on a cable whose far end is down. The wire died of it once in CI, taking both devices.
                    if err.errno != errno.EIO:
                        raise


# --- the probe: what the link really does -------------------------------------------------------------------------


def probe_server(address: str) -> None:
    """Echo one byte per byte (round trips), then take a bulk transfer and answer with one byte when it ends."""
    with socket.create_server((address, 0)) as server:
        print(server.getsockname()[1], flush=True)
        connection, _ = server.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (byte := connection.recv(1)) != b"B":
                connection.sendall(byte)
            header = b""
            while len(header) < 32:
                header += connection.recv(32 - len(header))
            size = int(header.decode())
            received = 0
            while received < size:
                received += len(connection.recv(1 << 20))
            connection.sendall(b"!")


def probe_client(address: str, port: int, nbytes: int) -> None:
    with socket.create_connection((address, port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        trips = []
        for _ in range(10):
            started = time.perf_counter()
            connection.sendall(b"p")
            connection.recv(1)
            trips.append(time.perf_counter() - started)
        connection.sendall(b"B")
        connection.sendall(f"{nbytes:<32d}".encode())
        started = time.perf_counter()
        connection.sendall(bytes(nbytes))
        connection.recv(1)
        seconds = time.perf_counter() - started
    print(json.dumps({"rtt_ms": sorted(trips)[len(trips) // 2] * 1e3, "bulk_mbit_s": nbytes * 8 / seconds / 1e6}))


# --- the swarm: a bootstrap node and two timed peers, each in its namespace on its own core ----------------------

MODEL_YAML = """# benchmarks/wan.py: {base} with ViT-S/16's width and depth (21.3M parameters), 16 px digits
base: {base}
model:
  name: vit_small_patch16_224
  img_size: 16
  kwargs: {{patch_size: 4, embed_dim: 384, depth: 12, num_heads: 6}}
optim:
  lr: 0.001
  warmup_steps: 0
"""
ALGORITHMS = {  # the shipped config each algorithm starts from (its model replaced by MODEL_YAML's)
    "diloco": "digits_tiny_diloco",
    "gradient": "digits_tiny_gradient",
}
BATCH = 32  # digits_tiny's local batch
AVERAGING_TIMEOUT = 30.0  # vitpeer's default (digits_tiny's 15 s is for loopback): an exact diloco sync moves 170 MB
# each way, 14 s at 100 Mbit/s
TRACE_FILE = "step_trace.json"
PEER_DEADLINE_S = 1500.0


def bootstrap(address: str) -> None:
    """A DHT node for the peers to meet at (as ``vitpeer demo``'s); prints its address, lives until stdin closes."""
    import hivemind

    from vitpeer.peer.core.runtime.processes import children_die_with_us

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    children_die_with_us()
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{address}/tcp/0"])
    print(",".join(str(addr) for addr in dht.get_visible_maddrs()), flush=True)
    sys.stdin.read()
    dht.shutdown()


def step_trace(out: Path) -> Any:
    """A Lightning callback that writes ``TRACE_FILE``: every local step's (start, end of backward, end) wall
    clock, the swarm step after it, for diloco the training thread's total wait so far (None for gradient), and the
    peers the swarm counts; diloco's rounds; the
    model's parameter count."""
    import pytorch_lightning as pl

    class StepTrace(pl.Callback):
        def __init__(self) -> None:
            self.steps: list[list[float | int | None]] = []
            self.step: list[float | int | None] = []
            self.parameters = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.parameters = sum(param.numel() for param in pl_module.parameters())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.step = [time.time()]

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.step.append(time.time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            diloco = getattr(trainer.strategy.optimizer, "diloco", None)
            waited = diloco.wait_seconds if diloco is not None else None
            peers = trainer.strategy.optimizer.tracker.global_progress.num_peers
            self.steps.append([*self.step, time.time(), trainer.strategy.swarm_epoch, waited, peers])

        def on_train_end(self, trainer, pl_module) -> None:
            diloco = getattr(trainer.strategy.optimizer, "diloco", None)
            rounds = [vars(result) for result in diloco.rounds] if diloco is not None else []
            trace = {"parameters": self.parameters, "steps": self.steps, "rounds": rounds}
            (out / TRACE_FILE).write_text(json.dumps(trace) + "\n")

    return StepTrace()


def join(args: list[str]) -> None:
    """One timed peer: ``vitpeer join ARGS`` with ``ComputeClock`` and ``StepTrace`` added."""
    from benchmarks.utilisation import ComputeClock
    from vitpeer.peer.commands.extend import join_with_callbacks

    join_with_callbacks(
        args, lambda config: [ComputeClock(config.trainer.output_dir), step_trace(config.trainer.output_dir)]
    )


def _die_with_us() -> None:  # in the child, before exec: SIGTERM (a clean leave) if the benchmark dies
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Sampler:
    """Both sides' ``tx_bytes`` every ``period`` seconds, with the wall clock, in a thread."""

    def __init__(self, link: Link, period: float = 0.2):
        self.link, self.period = link, period
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="wan-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), *self.link.tx_bytes()))
            if self.stop.wait(self.period):
                self.samples.append((time.time(), *self.link.tx_bytes()))
                return

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def timeline(self, every_s: float = 1.0) -> list[list[float]]:
        """[seconds since the start, MB side A sent, MB side B sent] about every ``every_s``."""
        t0, a0, b0 = self.samples[0]
        shown, last = [], -every_s
        for t, a, b in self.samples:
            if t - last >= every_s or (t, a, b) == self.samples[-1]:
                shown.append([round(t - t0, 1), round((a - a0) / 1e6, 1), round((b - b0) / 1e6, 1)])
                last = t
        return shown

    def sent_between(self, start: float, end: float) -> int:
        """Bytes both sides sent between two wall-clock times (to the sampling period)."""

        def at(moment: float) -> int:
            before = [a + b for t, a, b in self.samples if t <= moment]
            return before[-1] if before else 0

        return at(end) - at(start)


def train_pair(
    link: Link, initial_peers: str, algorithm: str, target: int, steps: int, out: Path, verbose: bool = False
) -> tuple[list[subprocess.Popen], float]:
    """Start both peers of ``algorithm`` at once, each in its namespace on its own core; wait for them."""
    from vitpeer.peer.commands.demo import relay

    config = out / f"wan_{algorithm}.yaml"
    config.write_text(MODEL_YAML.format(base=ALGORITHMS[algorithm]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cores = os.cpu_count() or 1
    processes, relays = [], []
    started = time.monotonic()
    try:
        for side in (0, 1):
            peer_dir = out / algorithm / f"peer-{side + 1}"
            peer_dir.mkdir(parents=True)
            command = [*link.exec(side), "taskset", "--cpu-list", str(side % cores), sys.executable, "-m"]
            command += ["benchmarks.wan", "join", "--config", str(config), "--output-dir", str(peer_dir)]
            command += ["--host-maddr", f"/ip4/{link.addresses[side]}/tcp/0", "--initial-peers", initial_peers]
            command += ["--run-id", f"vitpeer-wan-{algorithm}-{os.getpid()}", "--algorithm", algorithm]
            command += ["--target-batch-size", str(target), "--max-steps", str(steps), "--batch-size", str(BATCH)]
            command += ["--averaging-timeout", str(AVERAGING_TIMEOUT), *(["--verbose"] if verbose else [])]
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=_die_with_us,
            )
            processes.append(process)
            name = f"{algorithm} peer {side + 1}"
            echo = threading.Thread(target=relay, args=(name, process.stdout, peer_dir / "log.txt"), daemon=True)
            echo.start()
            relays.append(echo)
        for process in processes:
            process.wait(timeout=max(1.0, PEER_DEADLINE_S - (time.monotonic() - started)))
        for echo in relays:
            echo.join(timeout=5)
    finally:
        from vitpeer.peer.core.runtime.processes import stop_all

        stop_all(processes)
    return processes, time.monotonic() - started


def one(
    link: Link, initial_peers: str, algorithm: str, target: int, steps: int, out: Path, verbose: bool = False
) -> dict[str, Any]:
    """Two peers train ``steps`` swarm steps of ``target`` samples with ``algorithm`` over the link."""
    from benchmarks.utilisation import CLOCK_FILE

    before, cpu_before = link.tx_bytes(), link.cpu_seconds()
    with Sampler(link) as sampler:
        processes, wall = train_pair(link, initial_peers, algorithm, target, steps, out, verbose)
    after = link.tx_bytes()
    peers = []
    for side, process in enumerate(processes):
        peer_dir = out / algorithm / f"peer-{side + 1}"
        if process.returncode != 0 or not (peer_dir / "all_results.json").is_file():
            tail = (peer_dir / "log.txt").read_text().splitlines()[-15:]
            raise RuntimeError(
                f"{algorithm} peer {side + 1} failed (exit code {process.returncode}): " + "\n".join(tail)
            )
        results = json.loads((peer_dir / "all_results.json").read_text())
        clock = json.loads((peer_dir / CLOCK_FILE).read_text())
        trace = json.loads((peer_dir / TRACE_FILE).read_text())
        log = (peer_dir / "log.txt").read_text()
        peers.append(
            {"results": results, "clock": clock, "trace": trace, "sent": after[side] - before[side], "log": log}
        )
    sent = sum(peer["sent"] for peer in peers)
    samples = sum(peer["results"]["samples_contributed"] for peer in peers)
    seconds = max(peer["results"]["train_runtime"] for peer in peers)
    timed = all(peer["clock"]["local_steps"] > 0 for peer in peers)
    phases = _bytes_by_phase([peer["trace"] for peer in peers], sampler)
    training = phases["training_blocked"] + phases["training_in_background"]
    return {
        "algorithm": algorithm,
        "config": f"{ALGORITHMS[algorithm]} with ViT-S/16 width and depth at 16 px (benchmarks/wan.py MODEL_YAML)",
        "parameters": peers[0]["trace"]["parameters"],
        "target_batch_size": target,
        "local_steps_per_round_per_peer": target / (2 * BATCH),
        "swarm_steps": steps,
        # the lower peer's share; None when a peer ran too few local steps for ComputeClock to time any
        "utilisation": min(peer["clock"]["share"] for peer in peers) if timed else None,
        "bytes_sent": sent,
        "samples": samples,
        "bytes_per_sample": sent / samples,
        # where the bytes went (see _bytes_by_phase); per trained sample while the peers trained, all of it and
        # what moved while no training thread waited (diloco: its rounds, none of the exact syncs)
        "bytes_by_phase": phases,
        "bytes_per_sample_while_training": training / samples,
        "bytes_per_sample_in_background": phases["training_in_background"] / samples,
        "swarm_samples_per_s": samples / seconds,
        "test_accuracy": sum(peer["results"]["test_accuracy"] for peer in peers) / len(peers),
        "wall_s": wall,
        "wire_cpu_s": link.cpu_seconds() - cpu_before,
        "started_at": sampler.samples[0][0],  # the wall clock of the timeline's 0
        "link_timeline": sampler.timeline(),
        "peers": [_peer_summary(peer, sampler) for peer in peers],
    }


def _waited(trace: dict[str, Any]) -> float | None:
    """diloco: seconds the training thread waited after ``ComputeClock``'s warm-up (the same local steps it times)."""
    from benchmarks.utilisation import WARMUP

    waited = [step[4] for step in trace["steps"]]
    if len(waited) <= WARMUP or waited[-1] is None:
        return None
    return waited[-1] - waited[WARMUP - 1]


def _bytes_by_phase(traces: list[dict[str, Any]], sampler: Sampler) -> dict[str, int]:
    """Bytes both sides sent until both peers began training (start-up: the DHT, state downloads), while a training
    thread waited on diloco (``_blocked_windows``), the rest of the training (for diloco its rounds in the
    background; for gradient every round, its training thread's waits are not traced), and after the last local
    step (the test, what the peers do as they leave)."""
    first = max(trace["steps"][0][0] for trace in traces)
    last = max(trace["steps"][-1][2] for trace in traces)
    start, stop = sampler.samples[0][0], sampler.samples[-1][0]
    windows = [(max(begin, first), end) for begin, end in _blocked_windows(traces) if end > first]
    blocked = sum(sampler.sent_between(begin, end) for begin, end in windows)
    return {
        "before_training": sampler.sent_between(start, first),
        "training_blocked": blocked,
        "training_in_background": sampler.sent_between(first, last) - blocked,
        "after_training": sampler.sent_between(last, stop),
    }


def _blocked_windows(traces: list[dict[str, Any]], at_least_s: float = 0.5) -> list[tuple[float, float]]:
    """The wall-clock spans in which either peer's training thread waited on diloco (a sync, a round, a download)
    for at least ``at_least_s`` within one local step, merged; none for gradient (its waits are not traced)."""
    spans = []
    for trace in traces:
        last = 0.0
        for _, backward_end, end, _, waited, _ in trace["steps"]:
            if waited is not None and waited - last >= at_least_s:
                spans.append((backward_end, end))
            last = waited if waited is not None else last
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _peer_summary(peer: dict[str, Any], sampler: Sampler) -> dict[str, Any]:
    """One peer's figures, and where its training thread waited: every local step that waited (diloco's exact
    syncs and rounds still in flight) or, for gradient, every swarm step, with the bytes sent meanwhile."""
    results, clock, trace = peer["results"], peer["clock"], peer["trace"]
    waits, last_epoch, last_waited, together = [], 0, 0.0, 0
    for start, backward_end, end, epoch, waited, peers in trace["steps"]:
        together += epoch != last_epoch and peers >= 2
        blocked = (waited - last_waited) if waited is not None else None
        if epoch != last_epoch or (blocked or 0.0) > 0.5:
            waits.append(
                {
                    "swarm_step": epoch,
                    "peers": peers,
                    "step_s": round(end - start, 3),
                    "after_backward_s": round(end - backward_end, 3),
                    "waited_s": None if blocked is None else round(blocked, 3),
                    "bytes_meanwhile": sampler.sent_between(backward_end, end),
                }
            )
        last_epoch, last_waited = epoch, waited if waited is not None else last_waited
    return {
        "share": clock["share"],
        "compute_s": clock["compute_s"],
        "wall_s": clock["wall_s"],
        "local_steps": results["local_steps"],
        "timed_local_steps": clock["local_steps"],  # ComputeClock leaves the first WARMUP local steps out
        "share_outside_waits": (
            clock["compute_s"] / (clock["wall_s"] - waited) if (waited := _waited(trace)) is not None else None
        ),
        "samples": results["samples_contributed"],
        "train_runtime": results["train_runtime"],
        "test_accuracy": results["test_accuracy"],
        "bytes_sent": peer["sent"],
        "waited_s": _waited(trace),
        "swarm_steps_with_both_peers": together,  # swarm steps this peer entered counting 2 peers
        "state_downloads_given_up": peer["log"].count("giving up loading state"),
        "waits": waits,
        "rounds": trace["rounds"],
    }


def run(
    diloco_target: int = 6400,
    diloco_steps: int = 3,
    gradient_target: int = 256,
    gradient_steps: int = 8,
    only: tuple[str, ...] = tuple(ALGORITHMS),
    keep: Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """The algorithms in ``only`` over one shaped link, in that order; the link's own measured round trip and rate
    with them. ``keep``: write the peers' folders (logs, results, traces) there instead of a temporary folder;
    ``verbose``: the peers log hivemind's and Lightning's records too."""
    sizes = {"diloco": (diloco_target, diloco_steps), "gradient": (gradient_target, gradient_steps)}
    started = time.monotonic()
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vitpeer-wan-") as tmp, Link() as link:
        out = Path(tmp) if keep is None else keep
        out.mkdir(parents=True, exist_ok=True)
        probe = link.probe()
        node = subprocess.Popen(
            [*link.exec(0), sys.executable, "-m", "benchmarks.wan", "bootstrap", link.addresses[0]],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            initial_peers = node.stdout.readline().strip()
            if not initial_peers:
                raise RuntimeError(f"the bootstrap node did not start (exit code {node.wait()})")
            for algorithm in only:
                target, steps = sizes[algorithm]
                measured[algorithm] = one(link, initial_peers, algorithm, target, steps, out, verbose)
        finally:
            node.stdin.close()
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    results = {
        "link": {
            "rate_mbit_s": RATE_MBIT,
            "round_trip_ms": 2 * ONE_WAY_DELAY_S * 1e3,
            "mtu": MTU,
            "how": "tbf (rate, one BDP of queue) + a user-space wire (delay): this kernel has no netem",
            "measured": probe,
        },
        **measured,
    }
    if "diloco" in measured and "gradient" in measured:
        diloco, gradient = measured["diloco"], measured["gradient"]
        results["bytes_per_sample_ratio"] = gradient["bytes_per_sample"] / diloco["bytes_per_sample"]
        # gradient's rounds against diloco's rounds alone: what crossed the link while they trained, per sample,
        # without diloco's exact syncs (blocking) and without either's start-up and end
        results["bytes_per_sample_ratio_rounds"] = (
            gradient["bytes_per_sample_while_training"] / diloco["bytes_per_sample_in_background"]
        )
    results["wall_s"] = time.monotonic() - started
    return results


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("run", [])
    if command == "wire":
        wire(args[0], args[1], float(args[2]))
    elif command == "probe-server":
        probe_server(args[0])
    elif command == "probe-client":
        probe_client(args[0], int(args[1]), int(args[2]))
    elif command == "bootstrap":
        bootstrap(args[0])
    elif command == "join":
        join(args)
    elif command == "run":
        import argparse

        from vitpeer.peer.core.config.options import setup_logging

        parser = argparse.ArgumentParser(prog="python -m benchmarks.wan run", description=__doc__.split("\n")[0])
        parser.add_argument("--diloco-target", type=int, default=6400, help="samples per diloco round")
        parser.add_argument("--diloco-steps", type=int, default=3, help="diloco rounds (swarm steps)")
        parser.add_argument("--gradient-target", type=int, default=256, help="samples per gradient swarm step")
        parser.add_argument("--gradient-steps", type=int, default=8, help="gradient swarm steps")
        parser.add_argument("--only", nargs="+", choices=tuple(ALGORITHMS), default=tuple(ALGORITHMS))
        parser.add_argument("--keep", type=Path, help="keep the peers' logs, results and traces in this folder")
        parser.add_argument("--verbose", action="store_true", help="the peers log hivemind's records too")
        options = vars(parser.parse_args(args))
        setup_logging(verbose=False)
        print(json.dumps(run(**options | {"only": tuple(options["only"])}), indent=2))
    else:
        sys.exit(f"usage: python -m benchmarks.wan [run|join|wire|probe-server|probe-client] ...; got {command!r}")
