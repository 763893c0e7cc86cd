"""Load for the link-cut tests: both ends of a checked byte stream, and the local app.

    link_load.py app      (the local app, run under `tether exec`)
    link_load.py client   (in the client namespace)
    link_load.py echo PORT  (a TCP echo server: one thread per connection)
    link_load.py pingpong HOST PORT OUT STOP  (round trips, timed; for the reconnect benchmark)

Every stream is a known sequence of 1 MiB chunks (a seeded random block whose first 8 bytes
are the chunk's index), so each receiver checks every byte at its offset as it arrives and names
the first wrong offset. Settings come from the environment (see `main`). Results: one JSON object
(app: written to RESULT; client: printed).
"""
import hashlib, http.server, json, os, random, socket, sys, threading, time, urllib.request

MIB = 1 << 20

# Bytes moved so far by each part (for the progress line a stuck run prints).
progress = {}


class Pattern:
    def __init__(self, seed):
        self.block = random.Random(seed).randbytes(MIB)
        self.index = -1
        self.current = b""

    def chunk(self, i):
        if i != self.index:
            self.index, self.current = i, i.to_bytes(8, "little") + self.block[8:]
        return self.current


class Checker:
    """Checks a received stream against its pattern, byte for byte, in order."""

    def __init__(self, seed):
        self.pattern, self.pos, self.error = Pattern(seed), 0, None

    def feed(self, data):
        view = memoryview(data)
        while view and self.error is None:
            i, off = divmod(self.pos, MIB)
            want = self.pattern.chunk(i)[off:off + len(view)]
            got = view[:len(want)]
            if got != want:
                bad = next(k for k in range(len(want)) if got[k] != want[k])
                self.error = f"wrong byte at offset {self.pos + bad}"
            self.pos += len(want)
            view = view[len(want):]


def send_pattern(sock, seed, mib, stop=None, key=""):
    """Sends at least `mib` chunks, and with `stop` (a callable) more until it says so."""
    pattern, i = Pattern(seed), 0
    while i < mib or (stop is not None and not stop() and i < 100000):
        sock.sendall(pattern.chunk(i))
        i += 1
        progress[key + "_sent"] = i * MIB
    sock.shutdown(socket.SHUT_WR)
    return i * MIB


def receive_checked(sock, seed, result, key):
    checker = Checker(seed)
    try:
        while True:
            data = sock.recv(256 * 1024)
            if not data:
                break
            checker.feed(data)
            progress[key + "_received"] = checker.pos
    except OSError as e:
        result[key + "_error"] = f"{type(e).__name__}: {e}"
    result[key + "_received"] = checker.pos
    if checker.error:
        result[key + "_error"] = checker.error


def both_ways(sock, send_seed, recv_seed, mib, result, key, stop=None):
    receiver = threading.Thread(target=receive_checked, args=(sock, recv_seed, result, key))
    receiver.start()
    try:
        result[key + "_sent"] = send_pattern(sock, send_seed, mib, stop, key)
    except OSError as e:
        result[key + "_error"] = f"send: {type(e).__name__}: {e}"
    receiver.join()
    sock.close()


def stop_file():
    """True once the test created the STOP file (it has done what it does during the load)."""
    path = os.environ.get("STOP")
    return path is None or os.path.exists(path)


def app():
    env = os.environ
    mib, result, done = int(env["STREAM_MIB"]), {"pid": os.getpid()}, threading.Event()

    class Local(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b"local\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("0.0.0.0", int(env["HTTP_PORT"])), Local)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    listener = socket.create_server(("0.0.0.0", int(env["STREAM_PORT"])))

    def stream():
        conn, _ = listener.accept()
        both_ways(conn, 1, 2, mib, result, "stream", stop=stop_file)
        done.set()

    def outgoing():
        host, port = env["ECHO_ADDR"].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.settimeout(None)
        both_ways(sock, 3, 3, int(env["ECHO_MIB"]), result, "echo", stop=done.is_set)

    def files():
        reads, wrong = 0, 0
        while reads < 1 or not done.is_set():
            with open(env["FILE"], "rb") as f:
                if hashlib.md5(f.read()).hexdigest() != env["FILE_MD5"]:
                    wrong += 1
            reads += 1
            progress["file_reads"] = reads
        result["file_reads"], result["file_wrong"] = reads, wrong

    def report():
        while True:
            time.sleep(5)
            print("app progress", json.dumps(progress), file=sys.stderr, flush=True)

    threading.Thread(target=report, daemon=True).start()
    threads = [threading.Thread(target=t) for t in (stream, outgoing, files)]
    print("app ready", flush=True)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(env["RESULT"], "w") as f:
        json.dump(result, f)


def client():
    env = os.environ
    mib, result, done = int(env["STREAM_MIB"]), {}, threading.Event()
    answers, failures = {}, []

    def requests():
        n = 0
        while not done.is_set() and n < 5000:
            n += 1
            try:
                with urllib.request.urlopen(env["HTTP_URL"] + f"/{n}", timeout=30) as r:
                    body = r.read().decode().strip()
                    key = "local" if body == "local" else "original" if body.startswith("original") else body
                    answers[key] = answers.get(key, 0) + 1
            except Exception as e:
                failures.append(f"request {n}: {type(e).__name__}: {e}")
            time.sleep(0.02)

    web = threading.Thread(target=requests)
    web.start()
    sock = socket.create_connection((env["STREAM_HOST"], int(env["STREAM_PORT"])), timeout=30)
    sock.settimeout(None)
    both_ways(sock, 2, 1, mib, result, "stream", stop=stop_file)
    done.set()
    web.join()
    result["http_answers"], result["http_failures"] = answers, failures[:10]
    result["http_failure_count"] = len(failures)
    print(json.dumps(result), flush=True)


def echo():
    server = socket.create_server(("0.0.0.0", int(sys.argv[2])), backlog=64)

    def serve(conn):
        with conn:
            while data := conn.recv(256 * 1024):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def pingpong():
    """32-byte round trips on one connection, back to back, until the STOP file exists (at most
    10 minutes); then the monotonic time of each completed round trip, one per line, to OUT."""
    host, port, out, stop = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    sock = socket.create_connection((host, port), timeout=30)
    sock.settimeout(60)
    message, times, start = b"x" * 32, [], time.monotonic()
    while not os.path.exists(stop) and time.monotonic() - start < 600:
        sock.sendall(message)
        got = 0
        while got < len(message):
            data = sock.recv(len(message) - got)
            if not data:
                raise SystemExit("the connection closed")
            got += len(data)
        times.append(time.monotonic())
    with open(out, "w") as f:
        f.write("\n".join(repr(t) for t in times))


if __name__ == "__main__":
    {"app": app, "client": client, "echo": echo, "pingpong": pingpong}[sys.argv[1]]()
