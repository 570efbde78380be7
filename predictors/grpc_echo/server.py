"""Serve a small gRPC echo service for coldgate's end-to-end tests.

The service is registered with generic handlers and raw bytes, so it needs no
.proto file and no generated code. Messages are opaque byte strings.

  /echo.Echo/Chat   bidirectional stream. Each request message is sent back
                    unchanged as soon as it arrives. When the client ends its
                    side, the call ends with status OK and the trailing metadata
                    x-echo-count (messages echoed) and x-echo-sha256-bin (SHA-256
                    of the concatenated messages).
  /echo.Echo/Fail   unary. Ends with RESOURCE_EXHAUSTED, the message in
                    FAIL_MESSAGE and the trailing metadata x-echo-retry-after-ms.
  /grpc.health.v1.Health/Check
                    the standard gRPC health check, for the service names "" and
                    "echo.Echo". It returns NOT_SERVING until
                    --startup_delay_seconds have passed, then SERVING.

Until the start-up delay has passed, Chat and Fail end with UNAVAILABLE, as a
model server does while it loads its model. The server speaks HTTP/2 only
(grpcio closes HTTP/1.1 connections), so a readiness probe must be a gRPC
health check.

Example:
  python server.py --port 50051 --startup_delay_seconds 2
"""

import argparse
import hashlib
import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "echo.Echo"
HEALTH_SERVICE = "grpc.health.v1.Health"
# Contains '%' and a non-ASCII character, which the gRPC wire format percent-encodes.
FAIL_MESSAGE = "quota 100% used – retry in 2 s"
FAIL_RETRY_AFTER_MS = "2000"

# grpc.health.v1.HealthCheckResponse{status: SERVING} and {status: NOT_SERVING}:
# field 1 (tag byte 0x08, varint) with the enum values 1 and 2.
HEALTH_SERVING = b"\x08\x01"
HEALTH_NOT_SERVING = b"\x08\x02"

logger = logging.getLogger("grpc_echo")


class EchoService:
    """Echo handlers that end calls with UNAVAILABLE until the start-up delay is over."""

    def __init__(self, startup_delay_seconds: float):
        self.ready = threading.Event()
        self.startup_delay_seconds = startup_delay_seconds

    def become_ready_later(self) -> None:
        def run() -> None:
            time.sleep(self.startup_delay_seconds)
            self.ready.set()
            logger.info("ready after a start-up delay of %.1f s", self.startup_delay_seconds)

        threading.Thread(target=run, name="startup-delay", daemon=True).start()

    def reject_until_ready(self, context: grpc.ServicerContext, method: str) -> None:
        if not self.ready.is_set():
            logger.info("%s rejected with UNAVAILABLE: still starting", method)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the echo server is still starting; retry later")

    def chat(self, request_iterator, context: grpc.ServicerContext):
        self.reject_until_ready(context, "Chat")
        count = 0
        digest = hashlib.sha256()
        for message in request_iterator:
            count += 1
            digest.update(message)
            yield message
        context.set_trailing_metadata(
            (
                ("x-echo-count", str(count)),
                ("x-echo-sha256-bin", digest.digest()),
            )
        )
        logger.info("Chat ended after %d messages", count)

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.reject_until_ready(context, "Fail")
        context.set_trailing_metadata((("x-echo-retry-after-ms", FAIL_RETRY_AFTER_MS),))
        logger.info("Fail called with %d bytes; ending with RESOURCE_EXHAUSTED", len(request))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, FAIL_MESSAGE)

    def health_check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        service = parse_health_check_request(request, context)
        if service not in ("", SERVICE):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}; use '' or {SERVICE!r}")
        return HEALTH_SERVING if self.ready.is_set() else HEALTH_NOT_SERVING


def parse_health_check_request(request: bytes, context: grpc.ServicerContext) -> str:
    """Return the service name of a serialized grpc.health.v1.HealthCheckRequest.

    The message has one field, `string service = 1`. An empty message means "".
    Anything else ends the call with INVALID_ARGUMENT.
    """
    if not request:
        return ""
    # Tag byte 0x0a is field 1 with wire type 2 (length-delimited). Names up to 127
    # bytes have a one-byte length.
    if len(request) < 2 or request[0] != 0x0A or request[1] > 127 or len(request) != 2 + request[1]:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"HealthCheckRequest of {len(request)} bytes is not a single service name of at most 127 bytes",
        )
    try:
        return request[2:].decode("utf-8")
    except UnicodeDecodeError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "HealthCheckRequest service name is not UTF-8")


def build_server(service: EchoService, max_workers: int) -> grpc.Server:
    # Without serializers grpcio passes the raw message bytes through.
    echo_handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Chat": grpc.stream_stream_rpc_method_handler(service.chat),
            "Fail": grpc.unary_unary_rpc_method_handler(service.fail),
        },
    )
    health_handler = grpc.method_handlers_generic_handler(
        HEALTH_SERVICE,
        {"Check": grpc.unary_unary_rpc_method_handler(service.health_check)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    server.add_generic_rpc_handlers((echo_handler, health_handler))
    return server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on.")
    parser.add_argument("--host", default="127.0.0.1", help="IP address to listen on.")
    parser.add_argument(
        "--startup_delay_seconds",
        type=float,
        default=0.0,
        help="Seconds during which the health check returns NOT_SERVING and calls end with UNAVAILABLE.",
    )
    parser.add_argument(
        "--max_workers",
        type=int,
        default=32,
        help="Threads that run calls. Each open Chat stream occupies one.",
    )
    parser.add_argument(
        "--stop_grace_seconds",
        type=float,
        default=2.0,
        help="Seconds that open calls get to finish after SIGTERM or SIGINT.",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.startup_delay_seconds < 0:
        raise SystemExit(f"--startup_delay_seconds {args.startup_delay_seconds} is invalid. Use 0 or more.")
    if args.max_workers < 1:
        raise SystemExit(f"--max_workers {args.max_workers} is invalid. Use 1 or more.")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    service = EchoService(args.startup_delay_seconds)
    server = build_server(service, args.max_workers)
    address = f"{args.host}:{args.port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as error:
        raise SystemExit(f"could not listen on {address}: {error}. Choose a free --port.") from error
    server.start()
    logger.info("listening on %s", address)
    service.become_ready_later()

    stopped = threading.Event()

    def stop(signum, _frame) -> None:
        logger.info("received signal %d; stopping with a grace of %.1f s", signum, args.stop_grace_seconds)
        server.stop(args.stop_grace_seconds).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait_for_termination()
    stopped.wait()
    logger.info("stopped")


if __name__ == "__main__":
    main()
