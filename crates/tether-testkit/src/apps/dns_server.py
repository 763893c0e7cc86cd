"""A tiny authoritative DNS server over UDP for tests: `dns_server.py PORT NAME=IPV4 ...`.

Answers A queries for the names given (case-insensitive, with or without the final dot), NOERROR
with no answer for other types of a known name, NXDOMAIN for the rest. Prints "ready" once bound.
"""

import socket
import struct
import sys

port = int(sys.argv[1])
records = {}
for pair in sys.argv[2:]:
    name, ip = pair.split("=")
    records[name.lower().rstrip(".")] = socket.inet_aton(ip)

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", port))
print("ready", flush=True)

while True:
    query, peer = sock.recvfrom(4096)
    if len(query) < 12:
        continue
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    labels, at = [], 12
    while at < len(query) and query[at] != 0:
        length = query[at]
        labels.append(query[at + 1 : at + 1 + length].decode(errors="replace"))
        at += 1 + length
    question_end = at + 5
    if qdcount != 1 or question_end > len(query):
        continue
    qtype = struct.unpack("!H", query[at + 1 : at + 3])[0]
    name = ".".join(labels).lower()
    address = records.get(name)
    answers = b""
    rcode = 0 if address is not None else 3
    if address is not None and qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + address
    recursion_desired = flags & 0x0100
    header = struct.pack(
        "!HHHHHH", ident, 0x8400 | recursion_desired | rcode, 1, 1 if answers else 0, 0, 0
    )
    sock.sendto(header + query[12:question_end] + answers, peer)
