# A stand-in for a mesh sidecar (Istio's Envoy in REDIRECT mode, Linkerd's proxy), for tests: the
# same traffic path, no mTLS and no policy. Listens on the inbound port (the pod's nat PREROUTING
# redirects every TCP connection there) and the outbound port (nat OUTPUT redirects the app's
# connections there), runs as the mesh's uid/gid (the mesh's rules let that user's traffic
# through), and forwards each connection to its original destination (SO_ORIGINAL_DST) —
# inbound from SOURCE if given (Istio: 127.0.0.6), over lo, as the sidecar hands plaintext to the
# app.
# Usage (as root, inside the pod's namespace):
#   python3 sidecar.py UID INBOUND_PORT OUTBOUND_PORT [SOURCE]
#   Istio: 1337 15006 15001 127.0.0.6; Linkerd: 2102 4143 4140
import os, socket, struct, sys, threading

UID, INBOUND, OUTBOUND = (int(a) for a in sys.argv[1:4])
SOURCE = sys.argv[4] if len(sys.argv) > 4 else None
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


inbound, outbound = listen(INBOUND), listen(OUTBOUND)
# Sockets opened from here on belong to the mesh's user.
os.setgid(UID)
os.setuid(UID)
threading.Thread(target=serve, args=(outbound, None), daemon=True).start()
serve(inbound, SOURCE)
