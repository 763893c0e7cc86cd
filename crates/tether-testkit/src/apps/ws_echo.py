# A WebSocket-handshake server: answers the upgrade (101 with the right Sec-WebSocket-Accept),
# then echoes every chunk it gets prefixed with "NAME: ". (No WebSocket framing after the
# handshake: the test checks the upgraded byte stream, not a WebSocket library.)
# Usage: python3 ws_echo.py NAME PORT
import base64, hashlib, socket, sys, threading

name, port = sys.argv[1], int(sys.argv[2])
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def serve(c):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(4096)
        if not chunk:
            return
        data += chunk
    head = data.split(b"\r\n\r\n")[0].decode()
    key = [l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("sec-websocket-key:")][0]
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    c.sendall(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n".encode())
    while True:
        b = c.recv(4096)
        if not b:
            break
        c.sendall(name.encode() + b": " + b)
    c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
