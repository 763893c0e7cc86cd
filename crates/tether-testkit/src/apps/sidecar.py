# A stand-in for an Istio sidecar (Envoy in REDIRECT mode), for tests: the same traffic path, no
# mTLS and no policy. Listens on 15006 (inbound: the pod's nat PREROUTING redirects every TCP
# connection here) and 15001 (outbound: nat OUTPUT redirects the app's connections here), runs as
# uid/gid 1337 (the mesh's rules let that user's traffic through), and forwards each connection
# to its original destination (SO_ORIGINAL_DST) — inbound from source 127.0.0.6 over lo, as Envoy
# hands plaintext to the app.
# Usage (as root, inside the pod's namespace): python3 sidecar.py [UID]
import os, socket, struct, sys, threading

UID = int(sys.argv[1]) if len(sys.argv) > 1 else 1337
SO_ORIGINAL_DST = 80


def original(conn):
    data = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    (port,) = struct.unpack("!H", data[2:4])
    return socket.inet_ntoa(data[4:8]), port


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(conn, source):
    try:
        upstream = socket.socket()
        if source:
            upstream.bind((source, 0))
        upstream.connect(original(conn))
    except OSError:
        conn.close()
        return
    back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
    back.start()
    pump(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def serve(listener, source):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, source), daemon=True).start()


def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(512)
    return s


inbound, outbound = listen(15006), listen(15001)
# Sockets opened from here on belong to the mesh's user.
os.setgid(UID)
os.setuid(UID)
threading.Thread(target=serve, args=(outbound, None), daemon=True).start()
serve(inbound, "127.0.0.6")
