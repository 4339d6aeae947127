#!/usr/bin/env python3
"""Submit, watch, list and cancel Encore jobs over the coordinator's JobService.

A small client generated from proto/ (scripts/encore-job.sh generates the
stubs and runs it). A job spec is a JSON file in protobuf's JSON mapping of
encore.v1.JobSpec (deploy/examples/job-cpu-demo.json is one).

  submit SPEC.json [--key KEY] [--watch]   submit (idempotent per --key) and
                                           print the job id; --watch then
                                           follows it to its end
  watch JOB_ID [--after N]                 follow a job's events (a snapshot,
                                           or a replay from sequence N), to
                                           its end; exits 1 unless SUCCEEDED
  get JOB_ID                               the job, as JSON
  list                                     one line per job
  cancel JOB_ID [--reason TEXT]            cancel a job

The token (a client token of the coordinator) comes from --token, or
--token-file, or ENCORE_TOKEN.
"""

import argparse
import os
import sys
import uuid
from pathlib import Path


def load_stubs(gen_dir):
    """Imports the generated modules from gen_dir."""
    sys.path.insert(0, str(Path(gen_dir).resolve()))
    global grpc, json_format, job_pb2, job_pb2_grpc
    import grpc
    from google.protobuf import json_format

    from encore.v1 import job_pb2, job_pb2_grpc


def state_name(state):
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def describe(event):
    """One line for a job event."""
    kind = event.WhichOneof("event")
    if kind == "snapshot":
        job = event.snapshot
        return f"job {job.job_id}: {state_name(job.state)}, stage {job.stage or '-'}, step {job.step}"
    if kind == "state_change":
        change = event.state_change
        message = f" ({change.message})" if change.message else ""
        return f"state {state_name(change.previous)} -> {state_name(change.state)}{message}"
    if kind == "stage_change":
        return f"stage {event.stage_change.stage} from step {event.stage_change.step}"
    if kind == "metrics":
        p = event.metrics
        rewards = " ".join(f"{m}={s.mean:.4f}" for m, s in sorted(p.rewards.items()))
        return (
            f"step {p.step} [{p.stage}] v{p.policy_version}: {rewards} "
            f"combined={p.combined_reward_mean:.4f} kl={p.kl:.4f} loss={p.loss:.4f}"
        )
    return kind or "unknown event"


def watch(stub, auth, args, job_id, after=None):
    request = job_pb2.WatchJobRequest(job_id=job_id)
    if after is not None:
        request.after_sequence = after
    final = None
    for event in stub.Watch(request, metadata=auth, timeout=args.timeout_s):
        print(f"{event.sequence:>5}  {describe(event)}", flush=True)
        if event.WhichOneof("event") == "state_change":
            final = event.state_change.state
        elif event.WhichOneof("event") == "snapshot":
            final = event.snapshot.state
    if final != job_pb2.JOB_STATE_SUCCEEDED:
        sys.exit(f"job {job_id} ended {state_name(final) if final is not None else 'unseen'}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the coordinator")
    parser.add_argument("--token", help="a client token (or --token-file, or ENCORE_TOKEN)")
    parser.add_argument("--token-file", help="a file holding the client token")
    parser.add_argument("--gen", default="target/deploy-venv/gen", help="the generated stubs")
    parser.add_argument("--timeout-s", type=float, default=None, help="deadline of each call")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit")
    submit.add_argument("spec", help="JSON file of an encore.v1.JobSpec")
    submit.add_argument("--key", help="idempotency key (default: a fresh one)")
    submit.add_argument("--watch", action="store_true", help="then follow the job to its end")
    w = sub.add_parser("watch")
    w.add_argument("job_id")
    w.add_argument("--after", type=int, help="replay from this sequence (0: the whole history)")
    g = sub.add_parser("get")
    g.add_argument("job_id")
    sub.add_parser("list")
    c = sub.add_parser("cancel")
    c.add_argument("job_id")
    c.add_argument("--reason", default="cancelled from encore_job.py")
    args = parser.parse_args()

    token = args.token or os.environ.get("ENCORE_TOKEN")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if not token:
        sys.exit("error: no token (--token, --token-file or ENCORE_TOKEN)")
    load_stubs(args.gen)
    auth = [("authorization", f"Bearer {token}")]

    with grpc.insecure_channel(args.target) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        try:
            if args.command == "submit":
                spec = json_format.Parse(Path(args.spec).read_text(), job_pb2.JobSpec())
                response = stub.Submit(
                    job_pb2.SubmitJobRequest(idempotency_key=args.key or str(uuid.uuid4()), spec=spec),
                    metadata=auth,
                    timeout=args.timeout_s,
                )
                print(response.job.job_id, flush=True)
                if not response.created:
                    print(f"(already submitted under this key: {state_name(response.job.state)})",
                          file=sys.stderr)
                if args.watch:
                    watch(stub, auth, args, response.job.job_id)
            elif args.command == "watch":
                watch(stub, auth, args, args.job_id, args.after)
            elif args.command == "get":
                job = stub.Get(job_pb2.GetJobRequest(job_id=args.job_id), metadata=auth, timeout=args.timeout_s)
                print(json_format.MessageToJson(job))
            elif args.command == "list":
                request = job_pb2.ListJobsRequest()
                while True:
                    response = stub.List(request, metadata=auth, timeout=args.timeout_s)
                    for job in response.jobs:
                        print(f"{job.job_id}  {state_name(job.state):<10} step {job.step:<6} {job.spec.name}")
                    if not response.next_page_token:
                        break
                    request.page.page_token = response.next_page_token
            elif args.command == "cancel":
                job = stub.Cancel(
                    job_pb2.CancelJobRequest(job_id=args.job_id, reason=args.reason),
                    metadata=auth,
                    timeout=args.timeout_s,
                )
                print(f"{job.job_id}: {state_name(job.state)}")
        except grpc.RpcError as e:
            sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
