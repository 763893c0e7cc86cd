# A UDP echo server for test "pods": answers each datagram with b"echo " + datagram.
# Usage: python3 udp_echo.py PORT
import socket, sys

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65536)
    s.sendto(b"echo " + data, peer)
