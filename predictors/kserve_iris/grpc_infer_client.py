"""Send concurrent KServe v2 gRPC ModelInfer calls for the iris model and print the results as JSON.

All calls are started before the first one is awaited, so against a cold service
they are all held together. The calls are spread round-robin over --channels
channels, each with its own TCP connection, and several calls share each
connection as HTTP/2 streams. The client checks nothing itself: it prints one
JSON object with a result per call for the caller (tests/grpc.rs) to assert on,
and exits with 0 whenever it printed it.

Use --authority to set the HTTP/2 :authority, which coldgate routes by, while
--target names the address to connect to.

Example:
  python grpc_infer_client.py --target 127.0.0.1:8080 --authority iris.models.local --calls 20
"""

import argparse
import json
import sys
import time

import grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.infer_type import InferResponse

MODEL_NAME = "iris"

# Feature rows (sepal length, sepal width, petal length, petal width) and the
# classes that iris_server.py's tree returns for them: 0 setosa, 1 versicolor.
CASES = (
    ([[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]], [1, 1]),
    ([[5.1, 3.5, 1.4, 0.2]], [0]),
)


def infer_request(rows, request_id: str) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input-0",
        datatype="FP32",
        shape=[len(rows), len(rows[0])],
        contents=pb.InferTensorContents(fp32_contents=[value for row in rows for value in row]),
    )
    return pb.ModelInferRequest(model_name=MODEL_NAME, id=request_id, inputs=[tensor])


def predictions(response: pb.ModelInferResponse) -> list:
    # InferResponse decodes typed contents as well as raw_output_contents.
    outputs = InferResponse.from_grpc(response).outputs
    return [int(value) for value in outputs[0].as_numpy().reshape(-1)]


def open_channel(target: str, authority: str) -> grpc.Channel:
    options = [
        # Without a local pool, grpcio shares one connection between channels
        # that have the same target and options.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(target, options=options)


def run(args) -> dict:
    channels = [open_channel(args.target, args.authority) for _ in range(args.channels)]
    try:
        started = time.monotonic()
        pending = []
        for index in range(args.calls):
            rows, expected = CASES[index % len(CASES)]
            stub = pb_grpc.GRPCInferenceServiceStub(channels[index % len(channels)])
            future = stub.ModelInfer.future(infer_request(rows, f"call-{index}"), timeout=args.timeout)
            pending.append((index, expected, future))

        calls = []
        for index, expected, future in pending:
            result = {"index": index, "expected": expected}
            try:
                response = future.result()
                result.update(
                    {
                        "code": "OK",
                        "details": "",
                        "model_name": response.model_name,
                        "id": response.id,
                        "predictions": predictions(response),
                    }
                )
            except grpc.RpcError as error:
                result.update({"code": error.code().name, "details": error.details()})
            # Futures finish in any order, so this is when the result was read, an upper bound.
            result["done_by_ms"] = round((time.monotonic() - started) * 1000, 1)
            calls.append(result)
        return {"calls": calls, "elapsed_ms": round((time.monotonic() - started) * 1000, 1)}
    finally:
        for channel in channels:
            channel.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", required=True, help="host:port to connect to, such as 127.0.0.1:8080.")
    parser.add_argument("--authority", default="", help="HTTP/2 :authority to send; the target when empty.")
    parser.add_argument("--calls", type=int, default=20, help="Number of concurrent ModelInfer calls.")
    parser.add_argument("--channels", type=int, default=4, help="Channels (TCP connections) to spread the calls over.")
    parser.add_argument("--timeout", type=float, default=90.0, help="Deadline of each call in seconds.")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.calls < 1 or args.channels < 1:
        raise SystemExit(f"--calls {args.calls} and --channels {args.channels} must both be 1 or more.")
    json.dump(run(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
