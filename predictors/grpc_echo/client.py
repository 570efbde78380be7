"""Call the gRPC echo service (server.py) and print what happened as one JSON object.

The client makes real gRPC calls with grpcio and checks nothing itself: the caller
(tests/grpc.rs) asserts on the JSON. The exit status is 0 whenever the JSON was
printed, even when the call ended with an error status.

  chat    opens /echo.Echo/Chat and plays ping-pong: it sends message i, waits
          for its echo, pauses --interval_ms, and sends message i + 1. It ends its
          side of the stream only after the last echo arrived. A proxy that holds
          back request or response messages until the stream ends therefore makes
          the call run into its deadline.
  unary   sends one unary call with a small payload to --method.

Use --authority to set the HTTP/2 :authority, which coldgate routes by, while
--target names the address to connect to.
"""

import argparse
import hashlib
import json
import queue
import sys
import threading
import time

import grpc

# Sizes of the chat messages in bytes. The 70,000 and 300,000 byte messages are
# larger than the initial HTTP/2 flow-control window of 65,535 bytes, so they
# need WINDOW_UPDATE frames on every hop.
CHAT_MESSAGE_SIZES = (5, 100, 70_000, 1, 300_000)


def chat_message(index: int, size: int) -> bytes:
    """Return deterministic bytes that differ per message and cover all byte values."""
    pattern = bytes((index * 31 + offset) % 256 for offset in range(256))
    return (pattern * (size // 256 + 1))[:size]


def metadata_to_json(metadata) -> dict:
    """Return the metadata as a dict. Values of binary (-bin) keys become hex strings."""
    result = {}
    for key, value in metadata or ():
        result[key] = value.hex() if isinstance(value, bytes) else value
    return result


def status_fields(code: grpc.StatusCode, details) -> dict:
    return {"code": code.name, "code_number": code.value[0], "details": details}


def open_channel(args) -> grpc.Channel:
    options = [("grpc.default_authority", args.authority)] if args.authority else []
    return grpc.insecure_channel(args.target, options=options)


def run_chat(args) -> dict:
    if not 1 <= args.messages <= len(CHAT_MESSAGE_SIZES):
        raise SystemExit(f"--messages {args.messages} is invalid. Use 1 to {len(CHAT_MESSAGE_SIZES)}.")
    messages = [chat_message(index, size) for index, size in enumerate(CHAT_MESSAGE_SIZES[: args.messages])]

    # The request iterator runs on a grpcio thread and sends the next message only
    # when the reading side puts it on this queue. None ends the client's side.
    outgoing = queue.Queue()
    half_closed = threading.Event()

    def requests():
        while True:
            message = outgoing.get()
            if message is None:
                half_closed.set()
                return
            yield message

    started = time.monotonic()
    echoes = []
    with open_channel(args) as channel:
        chat = channel.stream_stream("/echo.Echo/Chat")
        call = chat(requests(), timeout=args.timeout)
        outgoing.put(messages[0])
        sent_at = time.monotonic()
        try:
            for index, echo in enumerate(call):
                received_at = time.monotonic()
                expected = messages[index] if index < len(messages) else b""
                echoes.append(
                    {
                        "index": index,
                        "size": len(echo),
                        "matches_sent": echo == expected,
                        "round_trip_ms": round((received_at - sent_at) * 1000, 1),
                        "received_at_ms": round((received_at - started) * 1000, 1),
                        "before_half_close": not half_closed.is_set(),
                    }
                )
                if index + 1 < len(messages):
                    time.sleep(args.interval_ms / 1000)
                    outgoing.put(messages[index + 1])
                    sent_at = time.monotonic()
                else:
                    outgoing.put(None)
        except grpc.RpcError:
            # The call's status, details and trailers are read below.
            outgoing.put(None)
        result = status_fields(call.code(), call.details())
        result.update(
            {
                "echoes": echoes,
                "sent_sizes": [len(message) for message in messages],
                "sent_sha256": hashlib.sha256(b"".join(messages)).hexdigest(),
                "initial_metadata": metadata_to_json(call.initial_metadata()),
                "trailing_metadata": metadata_to_json(call.trailing_metadata()),
                "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
            }
        )
        return result


def run_unary(args) -> dict:
    started = time.monotonic()
    with open_channel(args) as channel:
        method = channel.unary_unary(args.method)
        try:
            response, call = method.with_call(b"coldgate test payload", timeout=args.timeout)
            result = status_fields(call.code(), call.details())
            result["response_size"] = len(response)
            result["trailing_metadata"] = metadata_to_json(call.trailing_metadata())
        except grpc.RpcError as error:
            result = status_fields(error.code(), error.details())
            result["trailing_metadata"] = metadata_to_json(error.trailing_metadata())
    result["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port to connect to, such as 127.0.0.1:8080.")
    parser.add_argument("--authority", default="", help="HTTP/2 :authority to send; the target when empty.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Deadline of the call in seconds.")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="Ping-pong on /echo.Echo/Chat.")
    chat.add_argument("--messages", type=int, default=len(CHAT_MESSAGE_SIZES), help="Messages to send.")
    chat.add_argument("--interval_ms", type=float, default=100.0, help="Pause in ms between an echo and the next message.")
    unary = commands.add_parser("unary", help="One unary call.")
    unary.add_argument("--method", default="/echo.Echo/Fail", help="Full method name, /package.Service/Method.")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    result = run_chat(args) if args.command == "chat" else run_unary(args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
