"""A hostile local user, stdlib only: the caller-binding attack tests run it as another uid,
from another network namespace, or as a forked pair. Usage: attacker.py MODE ARGS…; prints JSON.

- ``blind HOST PORT N PATH``: N times: connect, send a whole POST, close before any answer.
- ``get TARGET PATH``: an honest request: send it, wait for the answer.
- ``late TARGET PATH``: connect, wait half a second (the server may refuse at accept
  meanwhile), then send the request and read the answer.
- ``hold HOST PORT N``: open N connections and keep them; report how many the server closed.
- ``fork-send TARGET PATH EXE``: connect, fork; the parent execs EXE (keeping the socket),
  the child waits for that exec, then sends the request and reports the answer.
- ``handoff TARGET PATH EXE``: send a request, then hand the open connection to a child running
  ``EXE attacker.py send-fd FD PATH``, which sends a second one; reports both answers.
TARGET: ``HOST:PORT`` or a Unix socket path.
- ``squat HOST``: bind HOST:0 and listen; print the port, then hold it until stdin closes.
- ``upgrade TARGET PATH``: a WebSocket opening handshake; reports the answer's status.
"""

import json
import os
import socket
import subprocess
import sys
import time


def _request(path: str, body: bytes = b"", *, close: bool = False) -> bytes:
    method = b"POST" if body else b"GET"
    connection = b"Connection: close\r\n" if close else b""
    return b"%s %s HTTP/1.1\r\nHost: localhost\r\n%bContent-Length: %d\r\n\r\n%s" % (
        method,
        path.encode(),
        connection,
        len(body),
        body,
    )


def _status(sock: socket.socket) -> dict[str, object]:
    data = b""
    sock.settimeout(10)
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        while True:  # the rest: the problem body, until the server closes
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        return {"status": None, "error": type(exc).__name__, "data": data.decode("latin-1")}
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    code = None
    if b'"code": "' in data:
        code = data.split(b'"code": "', 1)[1].split(b'"', 1)[0].decode()
    return {"status": status, "code": code}


def get(target: str, path: str) -> None:
    with _connect(target) as sock:
        sock.sendall(_request(path, close=True))
        print(json.dumps(_status(sock)))


def upgrade(target: str, path: str) -> None:
    handshake = (
        b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ) % path.encode()
    with _connect(target) as sock:
        sock.sendall(handshake)
        sock.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
            while b"101 " not in data[:13] and (chunk := sock.recv(65536)):
                data += chunk  # a refusal's body, until the server closes
        except OSError as exc:
            print(json.dumps({"status": None, "error": type(exc).__name__}))
            return
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    code = (
        data.split(b'"code": "', 1)[1].split(b'"', 1)[0].decode() if b'"code": "' in data else None
    )
    print(json.dumps({"status": status, "code": code}))


def late(target: str, path: str) -> None:
    with _connect(target) as sock:
        time.sleep(0.5)
        sock.sendall(_request(path, close=True))
        print(json.dumps(_status(sock)))


def blind(host: str, port: int, count: int, path: str) -> None:
    sent = 0
    for i in range(count):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(_request(path, b"blind %d" % i))
            sent += 1
    print(json.dumps({"sent": sent}))


def hold(host: str, port: int, count: int) -> None:
    held = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
    closed = 0
    for sock in held:
        sock.settimeout(5)
        try:
            while sock.recv(65536):  # an answer, then EOF: closed by the server
                pass
            closed += 1
        except TimeoutError:
            pass  # still open
        except OSError:
            closed += 1  # reset by the server
    print(json.dumps({"opened": len(held), "closed": closed}))


def _connect(target: str) -> socket.socket:
    if target.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(target)
        return sock
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket) -> dict[str, object]:
    """One keep-alive answer (head and Content-Length body), the connection left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return {"status": None}
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += sock.recv(65536)
    return {"status": int(head.split(b" ", 2)[1])}


def handoff(target: str, path: str, exe: str) -> None:
    sock = _connect(target)
    sock.sendall(_request(path))
    first = _answer(sock)
    child = subprocess.run(
        [exe, __file__, "send-fd", str(sock.fileno()), path],
        pass_fds=[sock.fileno()],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    print(json.dumps({"first": first, "second": json.loads(child.stdout)}))


def send_fd(fd: int, path: str) -> None:
    sock = socket.socket(fileno=fd)
    sock.sendall(_request(path, close=True))
    print(json.dumps(_status(sock)))


def fork_send(target: str, path: str, exe: str) -> None:
    sock = _connect(target)
    sock.set_inheritable(True)
    ready_r, ready_w = os.pipe()  # close-on-exec: EOF tells the child the parent has exec'd
    if os.fork() == 0:
        os.close(ready_w)
        os.read(ready_r, 1)
        sock.sendall(_request(path, close=True))
        print(json.dumps(_status(sock)), flush=True)
        os._exit(0)
    os.close(ready_r)
    os.execv(exe, [exe, "3"])  # e.g. sleep 3: the approved binary, holding the socket


def squat(host: str) -> None:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen()
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "blind":
        blind(args[0], int(args[1]), int(args[2]), args[3])
    elif mode == "get":
        get(args[0], args[1])
    elif mode == "late":
        late(args[0], args[1])
    elif mode == "hold":
        hold(args[0], int(args[1]), int(args[2]))
    elif mode == "fork-send":
        fork_send(args[0], args[1], args[2])
    elif mode == "handoff":
        handoff(args[0], args[1], args[2])
    elif mode == "send-fd":
        send_fd(int(args[0]), args[1])
    elif mode == "upgrade":
        upgrade(args[0], args[1])
    elif mode == "squat":
        squat(args[0])
    else:
        raise SystemExit(f"unknown mode {mode}")
