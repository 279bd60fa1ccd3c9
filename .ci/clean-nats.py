#!/usr/bin/env python3
"""Delete JetStream streams that earlier test and benchmark runs left behind on this machine's NATS.

Each stream reserves its max_bytes against JetStream's storage limit, so leftovers from runs that
died before their cleanup would pile up across CI runs. Speaks the plain NATS protocol, since no
NATS client is installed. Only streams named like the tests' and benchmarks' are touched.
"""
import json
import socket
import sys

PREFIXES = ("locus-test", "locus-bench")


def request(sock, reader, subject, payload=b""):
    sock.sendall(b"PUB %s _INBOX.clean %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
    sock.sendall(b"PING\r\n")
    while True:
        line = reader.readline()
        if not line:
            raise RuntimeError("NATS closed the connection")
        if line.startswith(b"MSG "):
            size = int(line.split()[-1])
            body = reader.read(size + 2)[:-2]
            return json.loads(body)
        if line.startswith(b"PING"):
            sock.sendall(b"PONG\r\n")
        if line.startswith(b"-ERR"):
            raise RuntimeError(line.decode().strip())


def main(host="127.0.0.1", port=4222):
    sock = socket.create_connection((host, port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()  # INFO
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\nSUB _INBOX.clean 1\r\n')
    names, offset = [], 0
    while True:
        page = request(sock, reader, "$JS.API.STREAM.NAMES", json.dumps({"offset": offset}).encode())
        names += page.get("streams") or []
        offset += len(page.get("streams") or [])
        if offset >= page.get("total", 0) or not page.get("streams"):
            break
    stale = [n for n in names if n.startswith(PREFIXES)]
    for name in stale:
        request(sock, reader, "$JS.API.STREAM.DELETE." + name)
    print(f"deleted {len(stale)} leftover test streams of {len(names)}")


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # a cleanup failure must not hide the tests' own verdict
        print(f"could not clean leftover streams: {error}", file=sys.stderr)
