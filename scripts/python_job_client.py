#!/usr/bin/env python3
"""A Python client of the coordinator's JobService, generated from proto/.

Like python_client.py for the reward server, it shows that proto/encore/v1/
is all another language needs. scripts/python-client.sh generates the stubs,
starts encore-coordinator and runs:

  services          lists the services the server offers through gRPC server
                    reflection (grpc.reflection.v1alpha), and fails unless
                    JobService, ClusterService, WeightService and
                    RolloutQueueService are there;
  submit-and-watch  submits a small job with a bearer token, watches it (a
                    snapshot first), cancels it from a second call, and
                    fails unless the watch stream shows the CANCELLED state
                    change and then ends; also checks that a call without a
                    token is refused with UNAUTHENTICATED.
"""

import argparse
import sys
import threading
import uuid
from pathlib import Path

EXPECTED_SERVICES = {
    "encore.v1.JobService",
    "encore.v1.ClusterService",
    "encore.v1.WeightService",
    "encore.v1.RolloutQueueService",
    "grpc.health.v1.Health",
}


def load_stubs(gen_dir):
    """Imports the generated modules from gen_dir."""
    sys.path.insert(0, str(Path(gen_dir).resolve()))
    global grpc, job_pb2, job_pb2_grpc, common_pb2, rollout_pb2
    import grpc
    from encore.v1 import common_pb2, job_pb2, job_pb2_grpc, rollout_pb2


def services(channel, args):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = set()
    for response in stub.ServerReflectionInfo(iter([request]), timeout=args.timeout_s):
        names.update(s.name for s in response.list_services_response.service)
    for name in sorted(names):
        print(f"  {name}")
    missing = EXPECTED_SERVICES - names
    if missing:
        sys.exit(f"reflection does not list {sorted(missing)}")
    foreign = {n for n in names if n.startswith("encore.") and n not in EXPECTED_SERVICES}
    if foreign:
        sys.exit(f"reflection lists services the coordinator does not serve: {sorted(foreign)}")
    print(f"OK: reflection lists {len(names)} services")


def small_spec():
    prompts = [
        rollout_pb2.Prompt(prompt_id=f"p{i}", caption=f"calm solo piano, take {i}")
        for i in range(4)
    ]
    return job_pb2.JobSpec(
        name="python client job",
        base_checkpoint=common_pb2.ModelRef(name="base", uri="runs/base/model.safetensors"),
        prompts=job_pb2.PromptSource(inline=job_pb2.PromptList(prompts=prompts)),
        rewards=[job_pb2.RewardConfig(model=common_pb2.ModelRef(name="quality"), weight=1.0)],
        algorithm=job_pb2.Algorithm(
            samples_per_prompt=2,
            batch_size=4,
            learning_rate=1e-4,
            kl_coef=0.05,
            sampling=rollout_pb2.SamplingParams(max_new_tokens=64),
        ),
        stop=job_pb2.StopCondition(max_steps=10),
        resources=job_pb2.JobResources(actors=1, learner_ranks=1),
    )


def submit_and_watch(channel, args):
    stub = job_pb2_grpc.JobServiceStub(channel)
    auth = [("authorization", f"Bearer {args.token}")]

    try:
        stub.List(job_pb2.ListJobsRequest(), timeout=args.timeout_s)
        sys.exit("a call without a token was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            sys.exit(f"a call without a token got {e.code()}, not UNAUTHENTICATED")
        print(f"  no token: {e.code().name}: {e.details()}")

    response = stub.Submit(
        job_pb2.SubmitJobRequest(idempotency_key=str(uuid.uuid4()), spec=small_spec()),
        metadata=auth,
        timeout=args.timeout_s,
    )
    job = response.job
    print(f"  submitted {job.job_id} (created={response.created}), "
          f"state {job_pb2.JobState.Name(job.state)}, seeds root {job.spec.seeds.root}")

    events = stub.Watch(
        job_pb2.WatchJobRequest(job_id=job.job_id), metadata=auth, timeout=args.timeout_s
    )
    seen = []

    def cancel_after_snapshot():
        stub.Cancel(
            job_pb2.CancelJobRequest(job_id=job.job_id, reason="python client test"),
            metadata=auth,
            timeout=args.timeout_s,
        )

    canceller = None
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "snapshot":
            seen.append(f"snapshot {job_pb2.JobState.Name(event.snapshot.state)}")
            canceller = threading.Thread(target=cancel_after_snapshot)
            canceller.start()
        elif kind == "state_change":
            seen.append(f"state {job_pb2.JobState.Name(event.state_change.state)}")
        else:
            seen.append(kind)
        print(f"  event {event.sequence}: {seen[-1]}")
    if canceller:
        canceller.join()
    if not seen or not seen[0].startswith("snapshot") or seen[-1] != "state JOB_STATE_CANCELLED":
        sys.exit(f"unexpected watch: {seen}")
    print("OK: submitted, watched and cancelled a job from Python")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the coordinator")
    parser.add_argument("--gen", default="target/python-client/gen", help="generated stubs")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("services")
    watch = sub.add_parser("submit-and-watch")
    watch.add_argument("--token", required=True, help="a client token of the coordinator")
    args = parser.parse_args()
    load_stubs(args.gen)
    with grpc.insecure_channel(args.target) as channel:
        {"services": services, "submit-and-watch": submit_and_watch}[args.command](channel, args)


if __name__ == "__main__":
    main()
