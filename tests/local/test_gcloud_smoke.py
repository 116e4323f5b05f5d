"""The gcloud fixture reaches the emulator, and only the emulator."""


def test_gcloud_lists_the_emulators_zones(gcloud):
    zones = {zone["name"]: zone for zone in gcloud.json("compute", "zones", "list")}
    assert "us-central1-a" in zones
    assert zones["us-central1-a"]["region"].endswith("/regions/us-central1")
    # The answer came from the emulator: its self links carry its address.
    assert zones["us-central1-a"]["selfLink"].startswith(gcloud.base_url.rstrip("/"))
