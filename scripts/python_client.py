#!/usr/bin/env python3
"""A Python client of encore.v1.RewardService, generated from proto/.

It exists to show that the protocol in proto/encore/v1/ is all another
language needs: the stubs come from `grpc_tools.protoc` over those files,
nothing is shared with the Rust code. scripts/python-client.sh generates
the stubs, starts a server, and compares this client's scores with those of
the Rust client `reward-score`.

Subcommands (each takes --target HOST:PORT and --gen DIR, the stubs):

  wait         polls the standard gRPC health check until the server reports
               encore.v1.RewardService as SERVING, or fails after --timeout-s;
  score        scores a JSON Lines items file in one Score call and prints
               {"scores": {model: [...]}, "model_sha256": {...}} like
               reward-score;
  bad-request  sends an item with a token outside the vocabulary the server
               describes, prints the status code, message and rich details
               (google.rpc.ErrorInfo and BadRequest from
               grpc-status-details-bin), and fails unless the server named the
               bad token.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def load_stubs(gen_dir):
    """Imports the generated modules from gen_dir."""
    sys.path.insert(0, str(Path(gen_dir).resolve()))
    global grpc, reward_pb2, reward_pb2_grpc
    import grpc
    from encore.v1 import reward_pb2, reward_pb2_grpc


def read_items(path):
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                items.append(reward_pb2.ScoreItem(caption=obj["caption"], tokens=obj["tokens"]))
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"{path}:{number}: not an item: {e}")
    if not items:
        sys.exit(f"{path} holds no items")
    return items


def wait(channel, args):
    """Polls grpc.health.v1.Health/Check; returns once SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="encore.v1.RewardService")
    deadline = time.monotonic() + args.timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            answer = health.Check(request, timeout=2.0)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                print(f"health: encore.v1.RewardService is {status}", file=sys.stderr)
                return 0
            last = status
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}"
        time.sleep(0.1)
    print(f"error: the server was not SERVING after {args.timeout_s} s ({last})", file=sys.stderr)
    return 1


def score(channel, args):
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    items = read_items(args.items)
    models = [m for m in args.models.split(",") if m] if args.models else []
    try:
        response = stub.Score(
            reward_pb2.ScoreRequest(items=items, models=models), timeout=args.timeout_s
        )
    except grpc.RpcError as e:
        print(f"error: Score failed: {describe(e)}", file=sys.stderr)
        return 1
    if len(response.results) != len(items):
        print(f"error: {len(response.results)} results for {len(items)} items", file=sys.stderr)
        return 1
    scores = {}
    for model in sorted(response.model_sha256):
        values = []
        for i, result in enumerate(response.results):
            if model not in result.scores:
                print(f"error: item {i} has no score from model {model!r}", file=sys.stderr)
                return 1
            values.append(result.scores[model].value)
        scores[model] = values
    print(json.dumps({"scores": scores, "model_sha256": dict(sorted(response.model_sha256.items()))}))
    return 0


def bad_request(channel, args):
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    described = stub.DescribeModels(reward_pb2.DescribeModelsRequest(), timeout=args.timeout_s)
    vocab = min(m.input.vocab_size for m in described.models)
    item = read_items(args.items)[0]
    position = min(17, len(item.tokens) - 1)
    item.tokens[position] = vocab
    field = f"items[0].tokens[{position}]"
    print(f"sending token {vocab} (vocabulary size {vocab}) at {field}")
    try:
        stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=args.timeout_s)
    except grpc.RpcError as e:
        print(f"  {describe(e)}")
        violations = [v for v in field_violations(e) if v.field == field]
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT or not violations:
            print(f"error: expected INVALID_ARGUMENT naming {field}", file=sys.stderr)
            return 1
        return 0
    print("error: the server scored a token outside its vocabulary", file=sys.stderr)
    return 1


def field_violations(error):
    """The BadRequest field violations in grpc-status-details-bin."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    violations = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
    return violations


def describe(error):
    """Code, message and rich details of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    text = f"code {error.code().name}: {error.details()}"
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            text += f"\n  ErrorInfo: reason {info.reason} domain {info.domain}"
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                text += f"\n  BadRequest: {v.field} ({v.reason}): {v.description}"
        else:
            text += f"\n  detail: {detail.type_url}"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the server's gRPC address, HOST:PORT")
    parser.add_argument(
        "--gen",
        default=str(Path(__file__).resolve().parent.parent / "target/python-client/gen"),
        help="directory of the stubs generated from proto/",
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of each call")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("wait", help="wait until the server is SERVING")
    scoring = commands.add_parser("score", help="score an items file")
    scoring.add_argument("--items", required=True)
    scoring.add_argument("--models", default="", help="comma-separated; all hosted models if empty")
    bad = commands.add_parser("bad-request", help="send a token outside the vocabulary")
    bad.add_argument("--items", required=True)
    args = parser.parse_args()

    load_stubs(args.gen)
    target = args.target.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        command = {"wait": wait, "score": score, "bad-request": bad_request}[args.command]
        return command(channel, args)


if __name__ == "__main__":
    sys.exit(main())
