# One keep-alive HTTP/1.1 connection driven from stdin: each line read is a path to GET on it,
# optionally followed by "|Name: value" headers;
# each answer's body is printed on one line. Like most clients, it reconnects and retries once
# when the connection was closed or reset under it, and then prefixes the answer with
# "reconnected: ". Bounded: 5 s timeout per request.
# Usage: python3 http_keepalive.py URL
import sys, http.client, urllib.parse

url = urllib.parse.urlsplit(sys.argv[1])
def connect():
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=5)

conn = connect()
for line in sys.stdin:
    path, *extra = line.strip().split("|")
    headers = dict(h.split(": ", 1) for h in extra)
    try:
        conn.request("GET", path, headers=headers)
        print(conn.getresponse().read().decode().strip(), flush=True)
    except (ConnectionError, http.client.HTTPException, OSError):
        conn.close()
        conn = connect()
        conn.request("GET", path, headers=headers)
        print("reconnected: " + conn.getresponse().read().decode().strip(), flush=True)
