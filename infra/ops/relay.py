"""One TCP connection carried over this process's stdin and stdout: ``python -c <this file> HOST PORT``.

`mlapi ui` runs it inside a model replica (Python is there, and the replica is on the overlay network Prometheus and
Alertmanager live on), once per browser connection, through `docker exec -i` over SSH: their ports stay published
nowhere. Standard library only, and no imports from this project: the replica runs this file's text as it is."""

import os
import socket
import sys
import threading

CHUNK = 65536


def relay(host: str, port: int) -> None:
    connection = socket.create_connection((host, port), timeout=10)
    connection.settimeout(None)

    def upstream() -> None:  # stdin -> the service; its end closes our sending half, the answer still comes back
        while chunk := os.read(0, CHUNK):
            connection.sendall(chunk)
        connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.buffer
    while chunk := connection.recv(CHUNK):
        out.write(chunk)
        out.flush()


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
