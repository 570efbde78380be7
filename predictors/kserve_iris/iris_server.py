"""Serve a scikit-learn iris classifier with the KServe Python model server.

The classifier is trained at start-up on the iris data set that ships inside
scikit-learn, so the server needs no network and no model files.

The HTTP server starts before the model is trained. Until training finishes,
GET /v1/models/iris and GET /v2/models/iris/ready return 503, and predict
requests return 503 too. After that they return 200. Use
--load_delay_seconds to make that window longer in tests.

Differences from a stock kserve.ModelServer:
  * gRPC is off unless --enable_grpc true is given, so no second port is bound.
  * The HTTP server binds --http_host (default 127.0.0.1). kserve 0.21.0
    hard-codes 0.0.0.0 and has no flag for it.
  * Only --workers 1 is accepted, because the model is loaded in this process.

Example:
  python iris_server.py --http_port 18080
"""

import argparse
import os
import threading
import time
import warnings

# KServe 0.21.0 triggers FastAPI's "ORJSONResponse is deprecated" warning on every
# request; it says nothing about this server and would flood coldgate's log.
warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated.*")

import kserve
import kserve.model_server
import numpy as np
from kserve.errors import InvalidInput
from kserve.logging import logger
from kserve.utils.utils import get_predict_input, get_predict_response
from sklearn.datasets import load_iris
from sklearn.tree import DecisionTreeClassifier

MODEL_NAME = "iris"
FEATURE_COUNT = 4
# A fixed seed makes the tree, and so every prediction, the same on each start.
RANDOM_STATE = 0


class IrisModel(kserve.Model):
    """Decision tree trained on the bundled iris data. Predictions are class
    indices: 0 setosa, 1 versicolor, 2 virginica."""

    def __init__(self, name: str):
        super().__init__(name)
        self.classifier = None

    def load(self) -> bool:
        features, labels = load_iris(return_X_y=True)
        classifier = DecisionTreeClassifier(random_state=RANDOM_STATE)
        classifier.fit(features, labels)
        self.classifier = classifier
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None):
        if isinstance(payload, (bytes, str)):
            # kserve 0.21.0 parses a v1 body as JSON only when Content-Type is
            # absent or exactly one of a few values, so even
            # "application/json; charset=utf-8" arrives here unparsed.
            content_type = (headers or {}).get("content-type")
            raise InvalidInput(
                f"request body was not parsed as JSON because of Content-Type "
                f"{content_type!r}; send Content-Type: application/json"
            )
        if not isinstance(payload, (dict, kserve.InferRequest)):
            raise InvalidInput(
                f"request body must be a JSON object, got {type(payload).__name__}; "
                'send {"instances": [[5.1, 3.5, 1.4, 0.2]]}'
            )
        if isinstance(payload, dict) and "instances" not in payload and "inputs" not in payload:
            raise InvalidInput(
                f"request body has no 'instances' key (keys: {sorted(payload)}); "
                'send {"instances": [[5.1, 3.5, 1.4, 0.2]]}'
            )
        try:
            features = np.asarray(get_predict_input(payload), dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"instances must be rows of 4 numbers: {error}") from error
        if features.ndim != 2 or features.shape[1] != FEATURE_COUNT:
            raise InvalidInput(
                f"expected a list of rows with {FEATURE_COUNT} numbers each "
                f"(sepal length, sepal width, petal length, petal width), "
                f"got an array of shape {list(features.shape)}"
            )
        classes = self.classifier.predict(features).astype(np.int64)
        return get_predict_response(payload, classes, self.name)


def build_parser() -> argparse.ArgumentParser:
    # kserve's parser brings --http_port, --grpc_port, --enable_grpc, --workers
    # and the other server options.
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        parents=[kserve.model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--http_host",
        default="127.0.0.1",
        help="IP address the HTTP server binds to.",
    )
    parser.add_argument(
        "--load_delay_seconds",
        default=0.0,
        type=float,
        help="Seconds to wait before training starts, so that tests can "
        "observe the not-ready window.",
    )
    parser.set_defaults(model_name=MODEL_NAME, enable_grpc=False)
    return parser


def bind_rest_server_to(host: str) -> None:
    """Make kserve's REST server listen on host instead of 0.0.0.0."""
    base_class = kserve.model_server.RESTServer

    class HostRESTServer(base_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # uvicorn reads config.host when it opens the listening socket.
            self.config.host = host

    kserve.model_server.RESTServer = HostRESTServer


def load_in_background(model: IrisModel, delay_seconds: float) -> None:
    def run() -> None:
        if delay_seconds > 0:
            logger.info("Waiting %.1f s before loading model %s", delay_seconds, model.name)
            time.sleep(delay_seconds)
        started = time.monotonic()
        try:
            model.load()
        except Exception:
            logger.exception("Loading model %s failed, exiting with status 1", model.name)
            # The server would otherwise report 503 forever.
            os._exit(1)
        elapsed_ms = (time.monotonic() - started) * 1000
        logger.info("Model %s is ready after %.0f ms of training", model.name, elapsed_ms)

    threading.Thread(target=run, name="load-" + model.name, daemon=True).start()


def main() -> None:
    args = build_parser().parse_args()
    if args.workers != 1:
        raise SystemExit(
            f"--workers {args.workers} is not supported because the model is "
            "trained in the main process. Run with --workers 1."
        )
    if args.load_delay_seconds < 0:
        raise SystemExit(
            f"--load_delay_seconds {args.load_delay_seconds} is invalid. Use 0 or more."
        )

    bind_rest_server_to(args.http_host)
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_grpc=args.enable_grpc,
        workers=1,
    )

    model = IrisModel(args.model_name)
    model.enable_latency_logging = args.enable_latency_logging
    # Registering the model before start() lets the readiness endpoints return
    # 503 while it loads. ModelServer.start() with an empty list skips its own
    # check that some model is already ready.
    server.register_model(model)
    load_in_background(model, args.load_delay_seconds)
    server.start([])


if __name__ == "__main__":
    main()
