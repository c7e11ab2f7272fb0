"""A counting TCP relay for measuring another program's bytes on the wire.

Data moves socket -> pipe -> socket with ``os.splice`` in threads, so the
kernel does the copying and the relay adds next to no CPU or GIL pressure to
the benchmark it measures. Handles several connections (QEMU multifd).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

CHUNK = 1 << 20


class CountingRelay:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.forward_bytes = 0  # client -> target
        self.backward_bytes = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = [self.listener]
        self._threads: list[threading.Thread] = []
        self._closed = False
        t = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:  # target gone: drop this client, keep accepting
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            for a, b, fwd in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(a, b, fwd), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        r, w = os.pipe()
        try:
            while True:
                n = os.splice(src.fileno(), w, CHUNK)
                if n == 0:
                    break
                left = n
                while left:
                    left -= os.splice(r, dst.fileno(), left)
                with self._lock:
                    if forward:
                        self.forward_bytes += n
                    else:
                        self.backward_bytes += n
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)
