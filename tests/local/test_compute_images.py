"""Compute emulator: boot disks as resources, images made from them, and VMs made from those images."""

import glob
import json
import os

import pytest
from googleapiclient.errors import HttpError

from cflow.local.compute.disk_images import DiskImages
from tests.helpers import instance_body, wait_operation, wait_until
from tests.local.test_compute_schema import DISCOVERY, check

PROJECT = "images-project"
ZONE = "us-central1-b"
# Writes what an image build bakes, at a guest's absolute path, then says so on the serial console.
BAKE = 'mkdir -p "$CFLOW_VM_ROOT/opt/baked" && echo "$BAKED" > "$CFLOW_VM_ROOT/opt/baked/hello.txt" && echo baked-ok'


@pytest.fixture(scope="module")
def schemas():
    with open(DISCOVERY) as handle:
        return json.load(handle)["schemas"]


def error_of(call):
    with pytest.raises(HttpError) as caught:
        call.execute()
    body = json.loads(caught.value.content)["error"]
    return caught.value.resp.status, body["errors"][0]["reason"], body["message"]


def status(compute, name):
    return compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()["status"]


def serial(compute, name):
    return compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance=name).execute()["contents"]


def disk_dir(state_dir, name):
    return wait_until(lambda: glob.glob(os.path.join(state_dir, "vms", f"{name}-*")), what=f"disk of {name}")[0]


def wait_global(compute, operation, timeout_s=30):
    result = wait_until(
        lambda: (done := compute.globalOperations().wait(project=PROJECT, operation=operation["name"]).execute())["status"] == "DONE" and done,
        timeout_s, what=f"global operation {operation['name']}",
    )
    assert "error" not in result, result
    return result


def baked_vm(compute, name, text, stop=True):
    """A VM whose startup script bakes ``text`` into /opt/baked/hello.txt; stopped once that is done."""
    body = instance_body(name, zone=ZONE, startup_script=f"BAKED={text!r}\n{BAKE}\n")
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    wait_until(lambda: "baked-ok" in serial(compute, name), what=f"{name} to bake")
    if stop:
        wait_operation(compute, PROJECT, ZONE, compute.instances().stop(project=PROJECT, zone=ZONE, instance=name).execute())
    return name


def insert_image(compute, name, disk, family=None, **params):
    body = {"name": name, "sourceDisk": disk}
    if family:
        body["family"] = family
    return compute.images().insert(project=PROJECT, body=body, **params).execute()


def test_the_boot_disk_is_a_zone_resource_named_after_the_vm(compute, compute_emulator, schemas):
    body = instance_body("img-disk-1", zone=ZONE, startup_script="true")
    body["disks"].append({"autoDelete": False, "initializeParams": {"diskName": "img-data-1", "diskSizeGb": "20"}, "boot": False})
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())

    boot = compute.disks().get(project=PROJECT, zone=ZONE, disk="img-disk-1").execute()
    check(boot, {"$ref": "Disk"}, schemas, "Disk")
    assert boot["users"] == [f"{compute_emulator.base_url}projects/{PROJECT}/zones/{ZONE}/instances/img-disk-1"]
    assert boot["sourceImage"].endswith("projects/debian-cloud/global/images/debian-12-bookworm-v20240110")
    assert boot["sizeGb"] == "10" and boot["status"] == "READY"
    listing = compute.disks().list(project=PROJECT, zone=ZONE).execute()
    check(listing, {"$ref": "DiskList"}, schemas, "DiskList")
    assert {"img-disk-1", "img-data-1"} <= {disk["name"] for disk in listing["items"]}
    # A second VM may not take a disk name that is in use.
    clash = instance_body("img-disk-2", zone=ZONE)
    clash["disks"][0]["initializeParams"]["diskName"] = "img-data-1"
    assert error_of(compute.instances().insert(project=PROJECT, zone=ZONE, body=clash))[:2] == (409, "alreadyExists")
    assert error_of(compute.disks().delete(project=PROJECT, zone=ZONE, disk="img-data-1"))[1] == "resourceInUseByAnotherResource"

    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="img-disk-1").execute())

    assert error_of(compute.disks().get(project=PROJECT, zone=ZONE, disk="img-disk-1"))[0] == 404  # autoDelete
    kept = compute.disks().get(project=PROJECT, zone=ZONE, disk="img-data-1").execute()
    assert "users" not in kept and kept["lastDetachTimestamp"]
    wait_operation(compute, PROJECT, ZONE, compute.disks().delete(project=PROJECT, zone=ZONE, disk="img-data-1").execute())
    assert error_of(compute.disks().get(project=PROJECT, zone=ZONE, disk="img-data-1"))[0] == 404


def test_an_image_of_a_stopped_vms_disk_holds_its_files_and_a_vm_from_it_sees_them(compute, compute_emulator, state_dir, schemas):
    baked_vm(compute, "img-src-1", "from the image")
    operation = insert_image(compute, "img-one", f"projects/{PROJECT}/zones/{ZONE}/disks/img-src-1", family="img-fam-a")
    check(operation, schemas["Operation"], schemas, "Operation")  # the schema itself: a global one has no zone
    assert "zone" not in operation and operation["operationType"] == "insert"
    assert operation["selfLink"] == f"{compute_emulator.base_url}projects/{PROJECT}/global/operations/{operation['name']}"
    done = wait_global(compute, operation)
    assert done["targetLink"] == f"{compute_emulator.base_url}projects/{PROJECT}/global/images/img-one"
    assert done["name"] in {op["name"] for op in compute.globalOperations().list(project=PROJECT).execute()["items"]}
    assert compute.globalOperations().get(project=PROJECT, operation=done["name"]).execute()["status"] == "DONE"

    image = compute.images().get(project=PROJECT, image="img-one").execute()
    check(image, {"$ref": "Image"}, schemas, "Image")
    assert (image["status"], image["family"], image["diskSizeGb"]) == ("READY", "img-fam-a", "10")
    assert image["sourceDisk"] == f"{compute_emulator.base_url}projects/{PROJECT}/zones/{ZONE}/disks/img-src-1"
    assert int(image["archiveSizeBytes"]) > 0
    tree = glob.glob(os.path.join(state_dir, "images", PROJECT, "img-one-*"))[0]
    assert open(os.path.join(tree, "opt", "baked", "hello.txt")).read() == "from the image\n"
    assert not {"serial-port-1.log", "startup-script"} & set(os.listdir(tree))  # bookkeeping stays out

    # The new VM's startup script finds the baked file already there, and writes its own copy.
    script = 'cat "$CFLOW_VM_ROOT/opt/baked/hello.txt" > seen.txt; echo changed > "$CFLOW_VM_ROOT/opt/baked/hello.txt"; echo "$CFLOW_VM_ROOT" > root.txt'
    body = instance_body("img-user-1", zone=ZONE, startup_script=script)
    body["disks"][0]["initializeParams"]["sourceImage"] = "global/images/family/img-fam-a"
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    root = disk_dir(state_dir, "img-user-1")
    wait_until(lambda: os.path.exists(os.path.join(root, "root.txt")) and os.path.getsize(os.path.join(root, "root.txt")), what="the startup script")
    assert open(os.path.join(root, "seen.txt")).read() == "from the image\n"
    assert open(os.path.join(root, "root.txt")).read().strip() == root
    assert open(os.path.join(tree, "opt", "baked", "hello.txt")).read() == "from the image\n"  # a copy, not a link
    disk = compute.disks().get(project=PROJECT, zone=ZONE, disk="img-user-1").execute()
    assert disk["sourceImage"] == image["selfLink"] and disk["sourceImageId"] == image["id"]


@pytest.mark.parametrize("reference", ["full-url", "zones/{zone}/disks/{disk}"])
def test_a_running_vms_disk_is_refused_unless_forced(compute, compute_emulator, reference):
    name = "img-busy-1" if reference == "full-url" else "img-busy-2"
    baked_vm(compute, name, "busy", stop=False)
    source = f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{ZONE}/disks/{name}" if reference == "full-url" else f"zones/{ZONE}/disks/{name}"

    code, reason, message = error_of(compute.images().insert(project=PROJECT, body={"name": f"{name}-img", "sourceDisk": source}))

    assert (code, reason) == (400, "resourceInUseByAnotherResource")
    zone_path = f"projects/{PROJECT}/zones/{ZONE}"
    assert message == f"The disk resource '{zone_path}/disks/{name}' is already being used by '{zone_path}/instances/{name}'"
    assert error_of(compute.images().get(project=PROJECT, image=f"{name}-img"))[0] == 404
    wait_global(compute, insert_image(compute, f"{name}-img", source, forceCreate=True))
    assert compute.images().get(project=PROJECT, image=f"{name}-img").execute()["status"] == "READY"
    assert status(compute, name) == "RUNNING"


def test_get_from_family_is_the_newest_image_that_is_not_deprecated(compute):
    baked_vm(compute, "img-src-2", "two")
    for name in ("img-old", "img-new"):
        wait_global(compute, insert_image(compute, name, f"zones/{ZONE}/disks/img-src-2", family="img-fam-b"))

    def newest():
        return compute.images().getFromFamily(project=PROJECT, family="img-fam-b").execute()["name"]

    assert newest() == "img-new"
    wait_global(compute, compute.images().deprecate(project=PROJECT, image="img-new", body={"state": "DEPRECATED"}).execute())
    assert newest() == "img-old"
    assert compute.images().get(project=PROJECT, image="img-new").execute()["deprecated"]["state"] == "DEPRECATED"
    wait_global(compute, compute.images().deprecate(project=PROJECT, image="img-new", body={"state": "ACTIVE"}).execute())
    assert newest() == "img-new"
    in_family = compute.images().list(project=PROJECT, filter="family = img-fam-b").execute()["items"]
    assert [image["name"] for image in in_family] == ["img-old", "img-new"]
    assert error_of(compute.images().getFromFamily(project=PROJECT, family="img-no-such-family"))[0] == 404


def test_delete_removes_the_image_and_its_content_and_names_are_unique(compute, state_dir):
    baked_vm(compute, "img-src-3", "three")
    wait_global(compute, insert_image(compute, "img-gone", f"zones/{ZONE}/disks/img-src-3"))
    again = compute.images().insert(project=PROJECT, body={"name": "img-gone", "sourceDisk": f"zones/{ZONE}/disks/img-src-3"})
    assert error_of(again)[:2] == (409, "alreadyExists")
    tree = glob.glob(os.path.join(state_dir, "images", PROJECT, "img-gone-*"))[0]

    operation = compute.images().delete(project=PROJECT, image="img-gone").execute()

    assert wait_global(compute, operation)["operationType"] == "delete"
    assert error_of(compute.images().get(project=PROJECT, image="img-gone"))[0] == 404
    assert "img-gone" not in {image["name"] for image in compute.images().list(project=PROJECT).execute().get("items", [])}
    assert not os.path.exists(tree)
    assert error_of(compute.images().delete(project=PROJECT, image="img-gone"))[0] == 404
    body = instance_body("img-late", zone=ZONE)
    body["disks"][0]["initializeParams"]["sourceImage"] = f"projects/{PROJECT}/global/images/img-gone"
    assert error_of(compute.instances().insert(project=PROJECT, zone=ZONE, body=body))[0] == 404


def test_public_images_are_read_only(compute):
    code, reason, message = error_of(compute.images().delete(project="debian-cloud", image="debian-12-bookworm-v20240110"))
    assert (code, reason) == (403, "forbidden") and "compute.images.delete" in message
    body = {"name": "mine", "sourceDisk": f"projects/{PROJECT}/zones/{ZONE}/disks/img-src-1"}
    assert error_of(compute.images().insert(project="debian-cloud", body=body))[:2] == (403, "forbidden")
    assert compute.images().get(project="debian-cloud", image="debian-12-bookworm-v20240110").execute()["status"] == "READY"


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"name": "img-x", "sourceDisk": f"zones/{ZONE}/disks/no-such-disk"}, (404, "notFound")),
        ({"name": "img-x", "sourceDisk": "disks/img-src-1"}, (400, "invalid")),
        ({"name": "img-x"}, (400, "invalidResourceUsage")),
        ({"name": "Not_A_Name", "sourceDisk": f"zones/{ZONE}/disks/img-src-1"}, (400, "invalid")),
    ],
    ids=["missing-disk", "malformed-disk", "no-source", "bad-name"],
)
def test_bad_image_requests_are_refused_as_gce_does(compute, body, expected):
    assert error_of(compute.images().insert(project=PROJECT, body=body))[:2] == expected


def test_an_image_deleted_while_a_vm_waits_to_copy_it_stays_until_copied(tmp_path):
    images = DiskImages(str(tmp_path))
    disk = tmp_path / "disk"
    (disk / "opt").mkdir(parents=True)
    (disk / "opt" / "file").write_text("content")
    (disk / "serial-port-1.log").write_text("console")
    os.symlink("file", disk / "opt" / "link")
    tree = images.tree_dir("p", "img", 7)
    assert images.capture(str(disk), tree) == len("content") + len("file")

    images.hold(tree)
    images.discard(tree)
    assert os.path.isdir(tree)
    images.restore(tree, str(tmp_path / "vm"))

    assert not os.path.exists(tree)
    assert (tmp_path / "vm" / "opt" / "file").read_text() == "content"
    assert os.readlink(tmp_path / "vm" / "opt" / "link") == "file"
    assert not (tmp_path / "vm" / "serial-port-1.log").exists()
