"""Run the iris predictor (iris_server.py) as a gRPC server that coldgate can probe.

kserve 0.21.0 needs two changes for that, and this wrapper makes them before it
runs iris_server.main() with the same command line:

  * Its gRPC server binds [::], every interface, with no flag to change that.
    The wrapper binds --http_host (default 127.0.0.1) instead, like the HTTP
    server. kserve's log line "Starting gRPC server on [::]:PORT" still names [::].
  * It has no standard gRPC health service, and its v2 ServerReady returns
    true before the model is loaded. The wrapper adds grpc.health.v1.Health/Check,
    which returns SERVING once kserve's own ModelReady call returns true for the
    model, and NOT_SERVING before. coldgate's `readiness_probe = "grpc"` calls it.

coldgate substitutes a single free port, {port}. A gRPC service puts it on
--grpc_port and lets the HTTP server, which nothing uses, take any free port
with --http_port 0:

  python iris_grpc_server.py --enable_grpc true --grpc_port 18081 --http_port 0
"""

import grpc
import kserve.protocol.grpc.server as kserve_grpc_server
from kserve.logging import logger
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

import iris_server

HEALTH_SERVICE = "grpc.health.v1.Health"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
# grpc.health.v1.HealthCheckResponse{status: SERVING} and {status: NOT_SERVING}:
# field 1 (tag byte 0x08, varint) with the enum values 1 and 2.
HEALTH_SERVING = b"\x08\x01"
HEALTH_NOT_SERVING = b"\x08\x02"


def bind_grpc_server_to(host: str) -> None:
    """Make kserve's gRPC server listen on host instead of [::]."""
    grpc_aio = kserve_grpc_server.aio

    class HostAio:
        """Replaces grpc.aio inside kserve.protocol.grpc.server."""

        @staticmethod
        def server(*args, **kwargs):
            server = grpc_aio.server(*args, **kwargs)
            add_insecure_port = server.add_insecure_port

            def add_insecure_port_on_host(address: str) -> int:
                # kserve passes "[::]:PORT", so only the port is kept.
                port = address.rpartition(":")[2]
                bracketed = f"[{host}]" if ":" in host else host
                return add_insecure_port(f"{bracketed}:{port}")

            server.add_insecure_port = add_insecure_port_on_host
            return server

    kserve_grpc_server.aio = HostAio


def parse_health_service_name(request: bytes) -> str:
    """Return the service name of a serialized grpc.health.v1.HealthCheckRequest.

    The message has one field, `string service = 1`, and an empty message means "".
    Raise ValueError for anything else.
    """
    if not request:
        return ""
    # Tag byte 0x0a is field 1 with wire type 2. Names up to 127 bytes have a one-byte length.
    if len(request) < 2 or request[0] != 0x0A or request[1] > 127 or len(request) != 2 + request[1]:
        raise ValueError(f"HealthCheckRequest of {len(request)} bytes is not a single service name of at most 127 bytes")
    return request[2:].decode("utf-8")


def serve_health_from_model_ready(model_name: str) -> None:
    """Add grpc.health.v1.Health/Check to kserve's gRPC server, backed by ModelReady."""
    stubs = kserve_grpc_server.grpc_predict_v2_pb2_grpc
    add_inference_servicer = stubs.add_GRPCInferenceServiceServicer_to_server

    def add_inference_and_health(servicer, server) -> None:
        add_inference_servicer(servicer, server)

        async def check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                service = parse_health_service_name(request)
            except (ValueError, UnicodeDecodeError) as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            if service not in ("", INFERENCE_SERVICE):
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"unknown service {service!r}; use '' or {INFERENCE_SERVICE!r}",
                )
            response = await servicer.ModelReady(pb.ModelReadyRequest(name=model_name), context)
            return HEALTH_SERVING if response.ready else HEALTH_NOT_SERVING

        # Without serializers grpcio passes the raw message bytes through.
        health_handler = grpc.method_handlers_generic_handler(
            HEALTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)}
        )
        server.add_generic_rpc_handlers((health_handler,))
        logger.info("Serving %s/Check from ModelReady for model %s", HEALTH_SERVICE, model_name)

    stubs.add_GRPCInferenceServiceServicer_to_server = add_inference_and_health


def main() -> None:
    args, _ = iris_server.build_parser().parse_known_args()
    bind_grpc_server_to(args.http_host)
    serve_health_from_model_ready(args.model_name)
    iris_server.main()


if __name__ == "__main__":
    main()
