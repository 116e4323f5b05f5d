# CFlow settings: edit the values below, then run `python3 scheduler.py`.
#
# This file is plain Python data. CFlow reads every UPPERCASE name and checks
# it; a misspelled name is an error (with a suggestion), so a typo never falls
# back to a default silently. Names of your own helpers must start with "_".
# Paths are relative to the directory that holds this file.

# ---------------------------------------------------------------- where to run

# "local": the cloud in a box on this machine (no account, no cost; VMs are
# local processes, Pub/Sub and Cloud Storage are emulators).
# "gcp": real Compute Engine VMs in PROJECT_NAME (billed to that project).
TARGET = "local"

# Your GCP project id, e.g. "my-project-123456". Required for TARGET = "gcp";
# ignored for TARGET = "local", which always uses the project "cflow-local".
PROJECT_NAME = None

# Cloud Storage bucket for the run's package, outputs, logs and done markers.
# None: "PROJECT-cflow" (locally "cflow-local-cflow", created on demand).
# On GCP the bucket must already exist; bucket names are global, so pick your own.
BUCKET = None

# ---------------------------------------------------------------- the work

# The command each worker runs once per work item: a string (split like a
# shell splits words, never run by one) or a list of strings. The item's
# fields are appended as extra arguments. Scripts must live under task/, the
# only folder of yours that is sent to the workers.
TASK_MODULE_CMD = "bash task/task.sh"

# The work items, one of:
# - a tasks file, e.g. "tasks.txt": one item per line, fields split like a shell;
# - a list, e.g. ["a.csv 1", ["b.csv", "2"]]: each a string split like a shell, or a list of strings;
# - "gs://BUCKET/PREFIX/": one item per object under the prefix, the item being its gs:// URL.
TASKS = "tasks.txt"

# True: before each task starts, every item field that is the gs:// URL of an
# object (gs://BUCKET/OBJECT) is downloaded into $CFLOW_INPUT_DIR on the
# worker, and the task gets the local file's path in that field's place (as
# dsub's --input does). A download that fails (no such object, no permission)
# is a failed attempt, and the item's log says which URL and why. The workers'
# service account needs read access to those buckets.
# False (the default): every field reaches the task as written.
STAGE_INPUTS = False

# Failed attempts (non-zero exit or timeout) before an item is recorded as
# failed. Preemptions of Spot VMs never count against this.
MAX_ATTEMPTS = 3

# Seconds one attempt may run; after that its whole process group is killed
# and the attempt counts as failed.
TASK_TIMEOUT = 3600

# How the per-item output files become one result:
# "concat": each output file name is concatenated across items in item order
#           (a CSV header shared by all items is kept once);
# "none":   outputs stay per item under the run's folder in the bucket.
COMBINE = "concat"

# Folder (on the controller) where the combined result is written, one
# subfolder per run.
RESULT_DIR = "output"

# True: each combined file is downloaded into RESULT_DIR/RUN_ID.
# False: it stays in the bucket only, under gs://BUCKET/cflow/runs/RUN_ID/combined/
# (the summary says where): for results too big to bring to this machine.
COMBINE_DOWNLOAD = True

# ---------------------------------------------------------------- the workers

# Number of worker VMs (fewer are created when fewer items are left).
WORKER_NODE_CNT = 5

# Workers are named PREFIX-RUNID-N: lowercase letters, digits and "-",
# starting with a letter, at most 40 characters.
VM_NAME_PREFIX = "cflow-worker"

# Machine type of each worker.
VM_TYPE = "e2-standard-2"

# GPUs: the type each worker gets, e.g. "nvidia-tesla-t4" (`gcloud compute
# accelerator-types list`), and how many. T4, P4, P100 and V100 attach to N1
# machine types only (e.g. VM_TYPE = "n1-standard-4"). Zones that do not
# offer the type are skipped, the GPU quotas are checked before anything is
# created, and the NVIDIA driver is installed at boot (or baked into an image
# by `cflow image build --gpu`). The task sees CFLOW_GPU_COUNT. None: no GPU.
VM_GPU_TYPE = None
VM_GPU_COUNT = 1

# Zone of the workers; when it has no capacity left (a stockout), the zones
# in VM_FALLBACK_ZONES are tried in order.
VM_ZONE = "us-central1-a"
VM_FALLBACK_ZONES = ["us-central1-b", "us-central1-c", "us-central1-f"]

# True: Spot VMs (much cheaper, may be preempted at any time; CFlow hands
# the item back and nothing is lost). False: standard VMs.
VM_SPOT = True

# How a worker gets its software:
# "stock": boots VM_STOCK_IMAGE and runs init.sh as its startup script, which
#          installs packages at every boot (simple, slower to start);
# "image": boots your own image VM_IMAGE_NAME with the packages preinstalled
#          (build it with `cflow image build`, which prints the lines to set).
VM_BOOT = "stock"
VM_STOCK_IMAGE = "projects/debian-cloud/global/images/family/debian-12"

# Your image for VM_BOOT = "image": an image name in PROJECT_NAME, or
# "family/NAME" for the newest image of a family.
VM_IMAGE_NAME = None

# Boot disk size of each worker, in GB.
VM_DISK_GB = 10

# Service account the workers run as: "default" (the project's default
# Compute Engine account) or an email address.
VM_COMPUTE_SERVICE_ACCOUNT = "default"

# Extra labels on every worker, e.g. {"team": "research"}. Keys starting with
# "cflow-" are CFlow's own.
VM_LABELS = {}

# The VPC network the workers join: a network's name in PROJECT_NAME, or
# "projects/HOST_PROJECT/global/networks/NAME" for a Shared VPC. A project
# without the "default" network needs this set (`gcloud compute networks list`).
VM_NETWORK = "default"

# The workers' subnetwork, in the region of the zones above: a name, or
# "projects/HOST_PROJECT/regions/REGION/subnetworks/NAME". None: the network's
# own subnetwork in that region (an auto-mode network has one in every region;
# a custom-mode network needs this set).
VM_SUBNETWORK = None

# True: each worker gets an ephemeral external IP (one IN_USE_ADDRESSES quota
# each). False: no external IP; the workers then reach Pub/Sub and Cloud
# Storage only if the subnetwork has Private Google Access or the network has
# Cloud NAT (see "Running on GCP" in the README). Needed when an organization
# policy forbids external IPs (constraints/compute.vmExternalIpAccess).
VM_EXTERNAL_IP = True

# A safety net for a controller that is gone for good: GCE deletes each worker
# this many hours after it started (scheduling.maxRunDuration, termination
# action DELETE), whatever happens here. A worker that runs out hands its item
# back and the scheduler, if alive, creates a fresh one. None: no limit.
MAX_RUN_HOURS = 24

# ---------------------------------------------------------------- plumbing

# Name prefixes of the run's Pub/Sub topic and subscription; the run's id is
# appended, so every run has its own and no old message leaks into a new run.
TOPIC_NAME = "cflow-topic"
SUBSCRIPTION_NAME = "cflow-sub"

# Seconds a worker holds an item before Pub/Sub redelivers it elsewhere. The
# worker extends it while the task runs, so this only bounds how long an item
# waits after its VM vanished without a word. Between 10 and 600.
LEASE_SECONDS = 60

# A service-account key for the controller only, e.g. "credential/key.json";
# None: Application Default Credentials. Never sent to the workers.
CREDENTIAL_FILE = None

# ESTIMATE ONLY, yours to update: USD per VM-hour by machine type (and per
# GPU-hour by GPU type), used for the cost shown in the run's summary. These
# are rough us-central1 on-demand and Spot figures; prices differ by region
# and change over time (Spot often). A machine type (or GPU type) missing here
# shows no cost estimate.
PRICES = {
    "e2-micro": {"standard": 0.0084, "spot": 0.0025},
    "e2-small": {"standard": 0.0168, "spot": 0.0050},
    "e2-medium": {"standard": 0.0335, "spot": 0.0101},
    "e2-standard-2": {"standard": 0.067, "spot": 0.020},
    "e2-standard-4": {"standard": 0.134, "spot": 0.040},
    "e2-standard-8": {"standard": 0.268, "spot": 0.080},
    "n2-standard-2": {"standard": 0.097, "spot": 0.029},
    "n2-standard-4": {"standard": 0.194, "spot": 0.058},
    "c2-standard-4": {"standard": 0.209, "spot": 0.063},
    "n1-standard-1": {"standard": 0.0475, "spot": 0.0100},
    "n1-standard-2": {"standard": 0.095, "spot": 0.020},
    "n1-standard-4": {"standard": 0.190, "spot": 0.040},
    "n1-standard-8": {"standard": 0.380, "spot": 0.080},
    # GPUs, USD per GPU-hour: a worker costs its machine type plus VM_GPU_COUNT
    # of these. us-central1 list prices from cloud.google.com/compute/gpus-pricing
    # as of 2024; Spot GPU prices change monthly.
    "nvidia-tesla-t4": {"standard": 0.35, "spot": 0.11},
    "nvidia-tesla-p4": {"standard": 0.60, "spot": 0.216},
    "nvidia-tesla-p100": {"standard": 1.46, "spot": 0.43},
    "nvidia-tesla-v100": {"standard": 2.48, "spot": 0.74},
}

# ---------------------------------------------------------------- Spot, backups and cost

# An item preempted this many times on Spot VMs moves to a small fleet of
# standard VMs, where no preemption can stop it again. None: it stays on Spot
# however often it is preempted.
SPOT_PREEMPTIONS_BEFORE_STANDARD = 3

# The most standard VMs that run the items moved off Spot. They are created
# only while such items wait or run, and deleted when none is left.
STANDARD_WORKERS_MAX = 2

# When every zone has been out of Spot capacity for this many minutes, create
# standard workers instead (up to WORKER_NODE_CNT) and say so. None: wait for
# Spot capacity however long it takes.
SPOT_STOCKOUT_FALLBACK_MINUTES = None

# True: once the queue is drained and workers sit idle, they run a second copy
# of the items that have run much longer than the run's typical item (backup
# tasks); the first copy to finish wins and the other is stopped. Set False
# if your task has side effects that must never happen twice at once.
BACKUP_TASKS = True

# ESTIMATE from PRICES, in US dollars: when the run's VM time reaches this
# cost, it stops creating VMs, lets the running items finish, cancels the
# rest (reported as not run) and exits with status 4. None: no cap.
MAX_COST_USD = None
