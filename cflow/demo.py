"""``cflow demo``: the sample end to end on the local stack.

Stages the demo's CSV shards in the bucket (skipping those already there),
then runs const.py's task over them exactly as ``cflow run`` does.
"""

import logging

from cflow import demo_data
from cflow.run import add_arguments, run_command

log = logging.getLogger(__name__)


def stage_shards(storage_client, bucket_name, shards):
    """Upload the shards under gs://BUCKET/cflow/demo/; returns how many were uploaded."""
    bucket = storage_client.bucket(bucket_name)
    present = {blob.name for blob in storage_client.list_blobs(bucket_name, prefix="cflow/demo/")}
    uploaded = 0
    for name, data in shards.items():
        object_name = f"cflow/demo/{name}"
        if object_name not in present:
            bucket.blob(object_name).upload_from_string(data, content_type="text/csv")
            uploaded += 1
    return uploaded


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="stage the demo's 125 CSV shards and run the sample task over them",
        description="Stage the demo data in the bucket, then do what `cflow run` does.",
    )
    add_arguments(parser)
    parser.set_defaults(func=demo_command)


def demo_command(args):
    def before_run(config, clients):
        from cflow.gcp.storage import RunStorage

        RunStorage(clients.storage, config.bucket, "demo").ensure_bucket(create_if_missing=config.is_local)
        count = stage_shards(clients.storage, config.bucket, demo_data.make_shards())
        print(f"demo data: {count} shard(s) staged in gs://{config.bucket}/cflow/demo/shards/", flush=True)

    return run_command(args, before_run=before_run)
