"""A minimal app, stdlib only, that the caller-binding tests run as other processes (another uid,
another executable, another cgroup). Usage: caller_client.py (tcp HOST PORT | unix PATH) PATH;
prints {"status": …, "code": …}."""

import http.client
import json
import socket
import sys


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def main() -> None:
    if sys.argv[1] == "tcp":
        connection = http.client.HTTPConnection(sys.argv[2], int(sys.argv[3]), timeout=10)
        path = sys.argv[4]
    else:
        connection = UnixConnection(sys.argv[2])
        path = sys.argv[3]
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    code = None
    if response.getheader("Content-Type", "").startswith("application/problem+json"):
        code = json.loads(body)["code"]
    print(json.dumps({"status": response.status, "code": code}))


if __name__ == "__main__":
    main()
