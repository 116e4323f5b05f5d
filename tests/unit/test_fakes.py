"""The fakes in tests/fakes.py follow the real seams: same method names, same parameters.

A fake that drifts from its real class lets a test pass against a call the
real seam would refuse; this keeps them in step.
"""

import inspect

import pytest

from tests import fakes

FAKES = [cls for _, cls in inspect.getmembers(fakes, inspect.isclass) if cls.__module__ == fakes.__name__ and hasattr(cls, "fakes")]


def parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def public_methods(cls):
    return {name for name, member in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_every_fake_of_a_seam_is_checked():
    assert {cls.__name__ for cls in FAKES} >= {"FakePubSub", "FakeStorage", "FakeMetadata", "FakeCompute", "FakeRunStorage", "FakeSchedulerPubSub"}


@pytest.mark.parametrize("fake", FAKES, ids=lambda cls: cls.__name__)
def test_a_fake_has_only_the_real_methods_with_the_real_parameters(fake):
    real = fake.fakes
    seam_methods = public_methods(fake) - set(fake.helpers)
    assert seam_methods, f"{fake.__name__} fakes nothing of {real.__name__}"
    missing = sorted(name for name in seam_methods if not callable(getattr(real, name, None)))
    assert not missing, f"{fake.__name__} has methods {real.__name__} does not: {missing}"
    for name in sorted(seam_methods):
        assert parameters(getattr(fake, name)) == parameters(getattr(real, name)), f"{fake.__name__}.{name} differs from {real.__name__}.{name}"


@pytest.mark.parametrize("fake", FAKES, ids=lambda cls: cls.__name__)
def test_helpers_are_not_seam_methods_in_disguise(fake):
    assert not [name for name in fake.helpers if hasattr(fake.fakes, name)]
