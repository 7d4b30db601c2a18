"""Serve one OpenStack WSGI application on 127.0.0.1 with the standard library's threaded server.

    python wsgi_serve.py MODULE PORT

The services parse sys.argv when their WSGI module is imported, so the arguments are taken out of
sys.argv before the import (a server such as gunicorn that leaves its own arguments there breaks
them). Configuration comes from the OS_*_CONFIG_* environment variables the caller sets.
"""

import importlib
import socketserver
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main() -> None:
    module, port = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0]]
    app = importlib.import_module(module).application
    server = make_server(
        "127.0.0.1", port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    print(f"serving {module} on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
