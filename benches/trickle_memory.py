#!/usr/bin/env python3
"""Memory under abusive TURN-over-TCP connections, and after they close.

Starts the release binary on loopback, opens N connections (default 2000) that each
send a STUN header announcing a 64 KiB message plus PARTIAL bytes of it and then
trickle one byte a second, and prints the server's RSS before, while they are open,
and after they are gone (cut off by turn.stream_message_timeout_s, or closed by this
script). Bounded: it runs for about a minute.

    cargo build --release && python3 benches/trickle_memory.py [N] [PARTIAL]
"""

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
PARTIAL = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
BIN = os.environ.get("MESHMEET_BIN", "target/release/meshmeet")
TIMEOUT_S = 20


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    d = tempfile.mkdtemp()
    cfg = os.path.join(d, "meshmeet.toml")
    with open(cfg, "w") as f:
        f.write(
            f'data_dir = "{d}/data"\n[http]\nlisten = "127.0.0.1:0"\n'
            f'[turn]\nlisten = "127.0.0.1:0"\ntls_listen = ""\n'
            f"max_stream_connections = {N + 100}\n"
            f"max_stream_connections_per_ip = {N + 100}\n"
            f"stream_message_timeout_s = {TIMEOUT_S}\n"
            '[log]\nlevel = "info"\n'
        )
    p = subprocess.Popen(
        [BIN, "--config", cfg], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    port = None
    for line in p.stderr:
        if "STUN/TURN listening" in line:
            port = int(line.split("tcp=")[1].split()[0].rsplit(":", 1)[1])
            break
    assert port, "no TURN port in the banner"
    time.sleep(1)
    base = rss_kib(p.pid)
    print(f"connections={N} partial_bytes={PARTIAL}")
    print(f"before: rss={base} KiB fds={fds(p.pid)}")
    # A Binding request header announcing 65532 attribute bytes, then part of them.
    header = bytes([0x00, 0x01, 0xFF, 0xFC, 0x21, 0x12, 0xA4, 0x42]) + os.urandom(12)
    socks = []
    started = time.time()
    for _ in range(N):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(header + b"\x00" * PARTIAL)
        socks.append(s)
    # Trickle one byte a second on every connection for a while.
    peak = 0
    for _ in range(TIMEOUT_S // 2):
        for s in socks:
            try:
                s.send(b"\x00")
            except OSError:
                pass
        peak = max(peak, rss_kib(p.pid))
        time.sleep(1)
    during = rss_kib(p.pid)
    print(
        f"during: rss={during} KiB peak={peak} KiB fds={fds(p.pid)} "
        f"({(peak - base) * 1024 // N} bytes per connection above the baseline)"
    )
    # Let the deadline cut them off; then close our ends.
    deadline = started + TIMEOUT_S + 5
    while time.time() < deadline and fds(p.pid) > 30:
        time.sleep(0.5)
    cut = fds(p.pid)
    for s in socks:
        s.close()
    time.sleep(3)
    after = rss_kib(p.pid)
    print(f"after:  rss={after} KiB fds={fds(p.pid)} (fds before closing ours: {cut})")
    p.terminate()
    p.wait(timeout=10)


if __name__ == "__main__":
    main()
