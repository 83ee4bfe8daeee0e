"""The QUIC library alone, in memory: aioquic (what PTTH used) against qh3 (what it uses), in one run.

Issue 17 asked whether qh3 (an aioquic fork whose connection core is native)
would lift TCP forwarding over QUIC, which aioquic's Python bounded at about
50 µs per datagram; PTTH moved to qh3 after this. This takes PTTH, sockets and the kernel out: a client
and a server connection in one process, datagrams handed across by a loop,
one stream carrying SIZE_MIB one way, the sender kept at most WINDOW_BYTES
ahead of what the receiver has read. Each library is driven through its
public API only (QuicConnection, QuicConfiguration, events). The figure is
the most such a transfer could reach on this machine with one core: MiB/s,
datagrams and CPU microseconds per datagram (both ends together).

    .venv/bin/pip install aioquic==1.7.2   # no longer a dependency of PTTH
    .venv/bin/python bench/quic_libs.py [--mib 64] [--runs 3] [--datagram 1200]
"""

from __future__ import annotations

import argparse
import importlib
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WINDOW_BYTES = 2 * 1024 * 1024
CHUNK_BYTES = 64 * 1024


def self_signed(folder: Path) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def transfer(lib: str, cert: tuple[str, str], size: int, datagram: int) -> dict[str, Any]:
    configuration = importlib.import_module(f"{lib}.quic.configuration")
    connection = importlib.import_module(f"{lib}.quic.connection")
    events = importlib.import_module(f"{lib}.quic.events")
    client_config = configuration.QuicConfiguration(is_client=True, alpn_protocols=["bench"],
                                                    max_datagram_size=datagram)
    client_config.verify_mode = ssl.CERT_NONE
    server_config = configuration.QuicConfiguration(is_client=False, alpn_protocols=["bench"],
                                                    max_datagram_size=datagram)
    server_config.load_cert_chain(*cert)
    client = connection.QuicConnection(configuration=client_config)
    server = connection.QuicConnection(configuration=server_config,
                                       original_destination_connection_id=client.original_destination_connection_id)
    client_addr, server_addr = ("127.0.0.1", 1111), ("127.0.0.1", 2222)
    now = time.monotonic()
    client.connect(server_addr, now=now)
    stream_id = None
    sent = received = datagrams = 0
    chunk = b"x" * CHUNK_BYTES
    cpu_start, wall_start = time.process_time(), time.monotonic()
    while received < size:
        now = time.monotonic()
        for sender, receiver, addr in ((client, server, client_addr), (server, client, server_addr)):
            for data, _ in sender.datagrams_to_send(now=now):
                datagrams += 1
                receiver.receive_datagram(data, addr, now=now)
            timer = sender.get_timer()
            if timer is not None and timer <= now:
                sender.handle_timer(now=now)
        while (event := server.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                received += len(event.data)
        while (event := client.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                stream_id = client.get_next_available_stream_id()
        if stream_id is not None:
            while sent < size and sent - received < WINDOW_BYTES:
                client.send_stream_data(stream_id, chunk[:min(CHUNK_BYTES, size - sent)])
                sent += min(CHUNK_BYTES, size - sent)
    wall, cpu = time.monotonic() - wall_start, time.process_time() - cpu_start
    return {"lib": lib, "mib_per_s": size / wall / 2**20, "datagrams": datagrams,
            "cpu_us_per_datagram": cpu / datagrams * 1e6, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--datagram", type=int, default=1200, help="max_datagram_size on both ends")
    args = parser.parse_args()
    libs = []
    for lib in ("aioquic", "qh3"):
        try:
            module = importlib.import_module(lib)
        except ImportError:
            print(f"quic_libs: {lib} is not installed (pip install {lib}); skipped", file=sys.stderr)
            continue
        libs.append((lib, getattr(module, "__version__", "?")))
    with tempfile.TemporaryDirectory() as folder:
        cert = self_signed(Path(folder))
        results: dict[str, list[dict[str, Any]]] = {lib: [] for lib, _ in libs}
        for _ in range(args.runs):  # alternated, so that noise falls on both alike
            for lib, _ in libs:
                results[lib].append(transfer(lib, cert, args.mib * 2**20, args.datagram))
    print(f"{args.mib} MiB one way in memory, max_datagram_size {args.datagram}, best of {args.runs}:")
    for lib, version in libs:
        best = max(results[lib], key=lambda r: r["mib_per_s"])
        print(f"  {lib} {version}: {best['mib_per_s']:.1f} MiB/s, {best['datagrams']} datagrams, "
              f"{best['cpu_us_per_datagram']:.1f} µs CPU per datagram")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
