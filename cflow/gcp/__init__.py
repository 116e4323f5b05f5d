"""The only place that talks to Google APIs: one small class per service.

    clients.py   builds the Google clients once (GCP, or the local cloud's endpoints)
    compute.py   Compute: workers by label, bulkInsert, delete until gone, images
    pubsub.py    PubSub: a run's topics and subscriptions, publish, pull, lease, ack
    storage.py   Bucket and RunStorage: the bucket, and one run's objects in it
    layout.py    the name of every object in the bucket
    metadata.py  Metadata: a VM's own metadata server
    errors.py    Google's errors -> CFlow's classes (cflow.errors); one line each
    retry.py     the backoff policy of every retried call

Each class takes an already-built client, so tests and the local stack pass in
clients pointed at emulators; nothing here reads endpoints itself. Nothing
outside this package (and the local cloud, cflow/local/) imports a Google
library or catches a Google exception.
"""
