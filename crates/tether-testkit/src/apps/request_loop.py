# Sends a GET to URL on a new connection every INTERVAL seconds, until stdin closes, at most
# COUNT requests or SECONDS seconds. Prints one line per request: the wall clock in milliseconds
# (Unix epoch) when it was sent, then the answer's body, or "ERROR <reason>". Each request has a
# 3 s timeout, so a dead endpoint shows as errors rather than a stall.
# Usage: python3 request_loop.py URL INTERVAL COUNT SECONDS
import sys, time, http.client, urllib.parse, threading

url = urllib.parse.urlsplit(sys.argv[1])
interval, count, seconds = float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
end = time.monotonic() + seconds
for i in range(count):
    if stop.is_set() or time.monotonic() > end:
        break
    sent = int(time.time() * 1000)
    try:
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=3)
        conn.request("GET", f"{url.path or '/'}?n={i}", headers={"Connection": "close"})
        body = conn.getresponse().read().decode().strip()
        conn.close()
    except Exception as e:
        body = f"ERROR {type(e).__name__}: {e}"
    print(f"{sent} {body}", flush=True)
    stop.wait(interval)
