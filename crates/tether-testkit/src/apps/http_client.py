# Sends COUNT requests to URL, each on a new connection, and prints each answer's body on one line
# ("ERROR <reason>" for a failed request). Bounded: every request has a 5 s timeout.
# Usage: python3 http_client.py URL COUNT [keepalive]
import sys, http.client, urllib.parse

url = urllib.parse.urlsplit(sys.argv[1])
count = int(sys.argv[2])
keepalive = len(sys.argv) > 3 and sys.argv[3] == "keepalive"
conn = None
for i in range(count):
    try:
        if conn is None or not keepalive:
            conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=5)
        conn.request("GET", f"{url.path or '/'}?n={i}", headers={} if keepalive else {"Connection": "close"})
        body = conn.getresponse().read().decode().strip()
        print(body, flush=True)
        if not keepalive:
            conn.close()
    except Exception as e:
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
        conn = None
