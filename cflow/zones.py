"""The Compute Engine zones CFlow knows, and the region of a zone.

The one list both sides use: the config checker accepts exactly these zones
for a local run (on GCP it also takes a well-formed zone missing here, since
Google adds zones), and the local Compute emulator serves exactly these.
Plain data with no imports, so workers can load it as cheaply as anything.
"""

# Region -> the letters of its zones, in the order CFlow lists them.
REGION_ZONES: dict[str, tuple[str, ...]] = {
    "us-central1": ("a", "b", "c", "f"),
    "us-east1": ("b", "c", "d"),
    "us-west1": ("a", "b", "c"),
    "europe-west1": ("b", "c", "d"),
    "europe-west4": ("a", "b", "c"),
    "asia-east1": ("a", "b", "c"),
}

KNOWN_ZONES: tuple[str, ...] = tuple(f"{region}-{letter}" for region, letters in REGION_ZONES.items() for letter in letters)


def region_of(zone: str) -> str:
    """The region a zone belongs to: the zone without its last ``-x`` part.

    Args:
        zone: a zone name such as ``"us-central1-a"``; it need not be in KNOWN_ZONES.
    Returns:
        The region name, e.g. ``"us-central1"``.
    """
    return zone.rsplit("-", 1)[0]
