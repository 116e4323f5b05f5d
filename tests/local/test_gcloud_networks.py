"""The real gcloud CLI, unchanged, reads and changes the emulator's networks, subnets, regions and accelerator types."""

IMAGE = ("--image", "debian-12-bookworm-v20240110", "--image-project", "debian-cloud")


def test_gcloud_lists_and_describes_the_default_network_and_its_subnets(gcloud):
    networks = gcloud.json("compute", "networks", "list")
    assert [(network["name"], network["autoCreateSubnetworks"]) for network in networks] == [("default", True)]
    described = gcloud.json("compute", "networks", "describe", "default")
    assert described["routingConfig"]["routingMode"] == "REGIONAL" and len(described["subnetworks"]) == 6
    subnets = {subnet["region"].rsplit("/", 1)[1]: subnet for subnet in gcloud.json("compute", "networks", "subnets", "list")}
    assert subnets["us-central1"]["ipCidrRange"] == "10.128.0.0/20"
    assert subnets["europe-west4"]["ipCidrRange"] == "10.164.0.0/20"
    subnet = gcloud.json("compute", "networks", "subnets", "describe", "default", "--region", "us-east1")
    assert (subnet["ipCidrRange"], subnet["gatewayAddress"]) == ("10.142.0.0/20", "10.142.0.1")
    table = gcloud.run("compute", "networks", "subnets", "list", "--filter", "region:us-west1").stdout
    assert "10.138.0.0/20" in table and "10.128.0.0/20" not in table


def test_gcloud_creates_updates_and_deletes_a_custom_network_and_subnet(gcloud):
    gcloud.run("compute", "networks", "create", "gc-vpc", "--subnet-mode", "custom")
    gcloud.run("compute", "networks", "subnets", "create", "gc-sub", "--network", "gc-vpc", "--region", "us-central1", "--range", "10.77.0.0/24")
    overlapping = gcloud.run(
        "compute", "networks", "subnets", "create", "gc-sub-2", "--network", "gc-vpc", "--region", "us-east1", "--range", "10.77.0.0/25", check=False
    )
    assert overlapping.returncode != 0
    assert "Invalid IPCidrRange: 10.77.0.0/25 conflicts with existing subnetwork 'gc-sub' in region 'us-central1'." in overlapping.stderr
    gcloud.run("compute", "networks", "subnets", "update", "gc-sub", "--region", "us-central1", "--enable-private-ip-google-access")
    subnet = gcloud.json("compute", "networks", "subnets", "describe", "gc-sub", "--region", "us-central1")
    assert (subnet["ipCidrRange"], subnet["privateIpGoogleAccess"]) == ("10.77.0.0/24", True)
    assert subnet["network"].endswith("/global/networks/gc-vpc")

    # A VM on a custom network must name a subnet, as GCE says.
    refused = gcloud.run("compute", "instances", "create", "gc-nosubnet", "--network", "gc-vpc", *IMAGE, check=False)
    assert refused.returncode != 0 and "Subnetwork should be specified for custom subnetmode network" in refused.stderr
    in_use = gcloud.run("compute", "networks", "delete", "gc-vpc", "--quiet", check=False)
    assert in_use.returncode != 0
    assert "The network resource 'projects/cflow-local/global/networks/gc-vpc' is already being used by" in in_use.stderr

    gcloud.run("compute", "networks", "subnets", "delete", "gc-sub", "--region", "us-central1", "--quiet")
    gcloud.run("compute", "networks", "delete", "gc-vpc", "--quiet")
    assert [network["name"] for network in gcloud.json("compute", "networks", "list")] == ["default"]


def test_gcloud_describes_regions_with_their_quotas(gcloud):
    region = gcloud.json("compute", "regions", "describe", "us-central1")
    quotas = {quota["metric"]: quota for quota in region["quotas"]}
    assert {"CPUS", "PREEMPTIBLE_CPUS", "INSTANCES", "IN_USE_ADDRESSES", "NVIDIA_T4_GPUS", "PREEMPTIBLE_NVIDIA_T4_GPUS"} <= set(quotas)
    assert quotas["PREEMPTIBLE_CPUS"]["limit"] == 0.0 and quotas["CPUS"]["limit"] > 0
    listed = gcloud.run("compute", "regions", "list").stdout
    assert "us-central1" in listed and "europe-west4" in listed


def test_gcloud_lists_accelerator_types_and_meets_gces_gpu_rules(gcloud):
    types = gcloud.json("compute", "accelerator-types", "list", "--filter", "zone:us-central1-a")
    assert "nvidia-tesla-t4" in {item["name"] for item in types}
    east = gcloud.json("compute", "accelerator-types", "list", "--filter", "zone:us-east1-b")
    assert east and "nvidia-tesla-t4" not in {item["name"] for item in east}
    t4 = gcloud.json("compute", "accelerator-types", "describe", "nvidia-tesla-t4", "--zone", "us-central1-a")
    assert t4["maximumCardsPerInstance"] == 4

    accelerator = ("--machine-type", "n1-standard-4", "--accelerator", "type=nvidia-tesla-t4,count=1")
    migrating = gcloud.run("compute", "instances", "create", "gc-gpu", *accelerator, *IMAGE, check=False)
    assert migrating.returncode != 0 and "Instances with guest accelerators do not support live migration." in migrating.stderr
    missing = gcloud.run("compute", "instances", "create", "gc-gpu", "--zone", "us-east1-b", *accelerator, "--maintenance-policy", "TERMINATE", *IMAGE,
                         check=False)  # fmt: skip
    assert missing.returncode != 0
    assert "The resource 'projects/cflow-local/zones/us-east1-b/acceleratorTypes/nvidia-tesla-t4' was not found" in missing.stderr
