"""Compute Engine in a box: the v1 REST API, each VM a local process group.

Run it::

    cflow emulator compute --host 127.0.0.1 --port 0 [--state-dir D] \\
        [--pubsub-emulator-host H:P] [--storage-emulator-host http://H:P] \\
        [--shutdown-grace S] [--preempt-mean-s S] [--zone-capacity ZONE=N ...] \\
        [--quota [REGION:]METRIC=N ...] [--cpu-quota N] [--deny-external-ip] \\
        [--no-default-network] [--error-rate R] [--boot-delay S] [--seed N] \\
        [--rate-limit-per-minute N] [--no-resource-not-ready] \\
        [--vm-root debian-12] [--auth-token-file F]

It prints ``compute emulator listening on http://H:P/compute/v1/`` once it
accepts requests, and serves until SIGTERM/SIGINT (then powers every VM off
in parallel and exits 0). Clients use it unchanged::

    googleapiclient.discovery.build("compute", "v1", credentials=AnonymousCredentials(),
        client_options={"api_endpoint": "http://H:P/compute/v1/"}, static_discovery=True)

The gcloud CLI and the GAPIC client google-cloud-compute work unchanged
(``CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE=http://H:P/compute/v1/``;
``ClientOptions(api_endpoint="http://H:P")``): see the README's "Pointing
gcloud at the emulator".

Batches: ``POST http://H:P/batch/compute/v1`` (where gcloud sends them).
googleapiclient takes a batch URI from the discovery document, not from
``api_endpoint``, so pass ``BatchHttpRequest(batch_uri="http://H:P/batch/compute/v1")``.

``--auth-token-file F``: every API request (batches too) must carry
``Authorization: Bearer <the token in F>``, else 401 as GCE answers
(``WWW-Authenticate``, reason ``required`` or ``authError``) and nothing
is done; the VMs' metadata servers are not behind it (``auth``).

Served: instances insert, bulkInsert (an ``operationGroupId``, and an
``insert`` operation per VM in that group, as GCE), get, list,
aggregatedList (filter, maxResults, pageToken), delete, stop, start, reset,
setLabels, setMetadata (fingerprints compared as bytes, standard or
URL-safe base64; else 412 conditionNotMet), setScheduling,
setDeletionProtection, simulateMaintenanceEvent, getSerialPortOutput
(port 1..4, start, next; the last 1 MB is kept); zoneOperations,
regionOperations and globalOperations get, wait, list, delete, and
globalOperations aggregatedList; disks get, list, aggregatedList, delete
(detached disks only); images insert (from a ``sourceDisk``; 400
resourceInUseByAnotherResource for a disk of a VM that is not TERMINATED
unless ``forceCreate=true``; 409 for a taken name), get, getFromFamily (the
newest READY image of the family that is not deprecated), list (filter),
delete, deprecate; imageFamilyViews get (and
``projects/P/zones/Z|-/imageFamilyViews/F`` as a source image, as gcloud
sends ``--image-family``); machineTypes get, list, aggregatedList
(``custom-N-MB`` types too); diskTypes get, list, aggregatedList; zones get,
list; regions get, list (with their ``quotas``); projects get (common
instance metadata, project-wide quotas) and setCommonInstanceMetadata
(guests see it under ``project/attributes/``); networks insert, get, list,
delete; subnetworks insert, get, list, aggregatedList, delete,
setPrivateIpGoogleAccess; acceleratorTypes get, list, aggregatedList.
List filters are GCE's (``filters``): ``name eq ".*\\bX\\b.*"`` as gcloud
rewrites ``--filter name=X``, ``ne``, ``=``/``!=``/``:``, parentheses, AND,
OR, NOT. Public images (debian-cloud, ubuntu-os-cloud, cos-cloud) are
read-only: changing them is 403 forbidden.

Networks, quotas, policy, GPUs: every project has the ``default`` auto-mode
network (one subnet per region in GCE's 10.128.0.0/9 auto ranges) unless
``--no-default-network``; a VM's interfaces must name networks and subnets
that exist (GCE's 400s and 404s), and get an address of their subnet.
``--quota`` limits CPUS, PREEMPTIBLE_CPUS, INSTANCES, IN_USE_ADDRESSES,
GPUS_ALL_REGIONS and the per-type GPU metrics (NVIDIA_T4_GPUS,
PREEMPTIBLE_NVIDIA_T4_GPUS...), as ``regions.get`` reports them (403
quotaExceeded beyond one; ``QUOTA_EXCEEDED`` in a bulkInsert's operation).
``--deny-external-ip`` is the organization policy
``constraints/compute.vmExternalIpAccess`` (412 conditionNotMet for a VM
with an access config). ``guestAccelerators`` are checked against the
zone's accelerator types. The rules and GCE's answers are in ``networks``,
``quotas``, ``policy`` and ``accelerators``.

A VM: its boot disk is ``STATE_DIR/vms/NAME-ID/`` (cwd; ``home/`` is HOME,
``tmp/`` is TMPDIR, ``bin/`` comes first on PATH, ``serial-port-1.log`` is
the serial console). Its metadata ``startup-script`` runs on entering
RUNNING (with bash unless it starts with ``#!``) in a process group of its
own; the environment holds only PATH, locale and PYTHONPATH/VIRTUAL_ENV from
the host, plus ``GCE_METADATA_HOST``/``GCE_METADATA_IP`` (its own metadata
server, ``127.0.0.1:PORT``), ``PUBSUB_EMULATOR_HOST``,
``STORAGE_EMULATOR_HOST``, ``CFLOW_COMPUTE_ENDPOINT``, ``CFLOW_EMULATED_VM=1``,
``CFLOW_VM_MARKER`` (finds its processes for cleanup) and ``CFLOW_VM_ROOT``.

``CFLOW_VM_ROOT`` is the VM's filesystem root for absolute guest paths:
emulated VMs share the host's filesystem, so a guest that writes
``/opt/cflow`` on GCE writes ``$CFLOW_VM_ROOT/opt/cflow`` here (scripts
that run on both write ``${CFLOW_VM_ROOT:-}/opt/cflow``).

Serial console: a script's stdout and stderr reach ``serial-port-1.log`` as
GCE's script runner logs them (``... google_metadata_script_runner[PID]:
startup-script: LINE``, then ``startup-script exit status N``; ``console``).

A real root (``--vm-root debian-12``, root only): a minimal Debian 12 built
once with debootstrap and cached under ``~/.cache/cflow/vm-roots/``
(``rootfs``); each VM runs its scripts chrooted in its own overlay on it, in
a mount namespace of its own, with ``metadata.google.internal`` its own
metadata server on port 80 (``guest_root``). Its disk is then the overlay's
upper directory, ``STATE_DIR/vms/NAME-ID/root/``, and its environment is a
GCE service's (no ``CFLOW_EMULATED_VM``, ``CFLOW_VM_ROOT``, host paths).

Disks and images: every disk of a VM is a resource of its zone, named as
GCE names it (the VM's name for the boot disk unless
``initializeParams.diskName``), deleted with the VM when ``autoDelete``.
``images.insert`` copies the boot disk's directory tree (without the serial
log, the script files and the poweroff shim) to
``STATE_DIR/images/PROJECT/NAME-ID/``; a VM made from that image starts
with a copy of it in its disk directory, before its startup script runs.
Nothing is kept across emulator restarts but those directories.

GCE's lifecycle rules hold: delete, stop or start of a VM still booting or
already stopping is 400 resourceNotReady (``--no-resource-not-ready``
accepts delete and stop); ``scheduling`` combinations are refused as GCE
refuses them, and ``maxRunDuration``/``terminationTime`` stop or delete a
VM when they run out (``scheduling``, ``lifecycle``); a repeated
``requestId`` gets the first call's operation back (``request_ids``);
``--rate-limit-per-minute`` is GCE's per-project rate quota, 403
rateLimitExceeded beyond it (``rate_limit``).

Stop, delete, preemption and guest power-off run the ``shutdown-script``
(same environment, same process group) within the grace period (30 s for
Spot/preemptible, 90 s standard, ``--shutdown-grace`` overrides), then
SIGTERM, then SIGKILL every process of the VM. A watchdog process kills them
all if the emulator itself dies (even by SIGKILL).

Guest power-off: a VM powers itself off, as ``poweroff`` does on GCE, with
``POST http://$GCE_METADATA_HOST/cflow-emulator/v1/poweroff`` and header
``Metadata-Flavor: Google``; the ``poweroff`` command on the VM's PATH does
exactly that. The VM runs its shutdown script and ends TERMINATED (operation
``compute.instances.guestTerminate``). Nothing on the host is touched.

Where things live: ``emulator`` (assembly, options), ``cli`` (the command),
``server`` (HTTP routes, one table per resource, and batches), ``auth``
(the bearer token), ``engine`` (the parts wired together), ``core`` (lock,
ids, shared tables, operations), one part per resource: ``zones`` (and
machine and disk types), ``instances``, ``disks``, ``images``,
``operations``, ``projects``, ``networks`` (networks, subnetworks, VMs'
interfaces and addresses), ``regions``, ``accelerators`` (accelerator types
and GPU rules); ``quotas`` (limits, usage, refusals), ``policy``
(organization policy); ``lifecycle`` (the VM state machine), ``guest_metadata`` and
``metadata`` (what a VM's metadata server answers, and the servers),
``resources`` (records and their JSON), ``validation`` (request bodies),
``filters`` (list filters), ``paging`` (page tokens), ``api_errors`` (GCE's
error answers), ``scheduling`` (scheduling rules and time limits),
``rate_limit`` (the rate quota), ``request_ids`` (requestId), ``catalog``
(zones, machine types, images), ``faults``, ``timers``, ``vm`` (guest
processes), ``console`` (scripts' output on the serial console),
``rootfs`` (building and caching real roots), ``guest_root`` (a VM's
overlay and namespace on one), ``disk_images`` (disk and image content),
``watchdog`` (kills VMs of a dead emulator).

Python API: ``ComputeEmulator(EmulatorOptions(...)).start()`` returns the
base URL, ``.stop()`` stops it (``cflow.local.compute.emulator``);
``cflow.local.launchers.launch_compute_emulator()`` runs it as a background
subprocess, as the local stack does.
"""
