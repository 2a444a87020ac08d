"""The registry in one process: register/status/unregister, views, and every refusal with its error kind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from service.errors import Conflict, Forbidden, InvalidInput, LimitExceeded, NotFound
from service.oip.types import SharedMemoryRef
from service.shm import SystemSharedMemory
from tests.service.shm.conftest import MakeShm

F32 = np.dtype("<f4")


def test_register_status_and_views_read_and_write_the_clients_bytes(
    registry: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(8192)
    values = np.arange(24, dtype=F32).reshape(2, 3, 4)
    obj.write(values, offset=4096 + 64)  # the region starts at 4096 in the object; the tensor 64 bytes into it
    registry.register("in", obj.key, 4096, 4096)
    assert registry.status() == [{"name": "in", "key": obj.key, "offset": 4096, "byte_size": 4096}]
    assert registry.status("in") == registry.status()

    view = registry.input_array(SharedMemoryRef("in", 64, values.nbytes), F32, (2, 3, 4))
    np.testing.assert_array_equal(view, values)
    assert not view.flags.writeable  # inputs are read-only views: the service never writes a client's input

    out = registry.output_array(SharedMemoryRef("in", 1000, 16), F32, (4,))
    out[...] = [1.5, 2.5, 3.5, 4.5]
    np.testing.assert_array_equal(obj.array(F32, (4,), offset=4096 + 1000), [1.5, 2.5, 3.5, 4.5])


def test_an_offset_that_is_not_page_aligned_maps_the_right_bytes(
    registry: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(10_000)
    values = np.linspace(-1, 1, 100, dtype=F32)
    obj.write(values, offset=4100 + 12)
    registry.register("odd", obj.key, 4100, 1000)
    np.testing.assert_array_equal(registry.input_array(SharedMemoryRef("odd", 12, 400), F32, (100,)), values)


def test_a_key_without_the_leading_slash_names_the_same_object(registry: SystemSharedMemory, make_shm: MakeShm) -> None:
    obj = make_shm(64)
    registry.register("plain", obj.name, 0, 64)
    assert registry.status("plain")[0]["key"] == obj.name


def test_unregister_one_all_and_unknown(registry: SystemSharedMemory, make_shm: MakeShm) -> None:
    obj = make_shm(4096)
    for name in ("a", "b", "c"):
        registry.register(name, obj.key, 0, 1024)
    registry.unregister("b")
    assert [s["name"] for s in registry.status()] == ["a", "c"]
    registry.unregister("never-registered")  # as in Triton: unregistering is idempotent
    registry.unregister()
    assert registry.status() == []
    assert registry.mapped == 0
    with pytest.raises(NotFound, match="'a' is registered"):
        registry.status("a")


def test_the_same_object_can_back_several_regions_and_names_are_arbitrary_text(
    registry: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(4096)
    names = ["../../etc/passwd", "with/slash", "ünïcode ✓", "x" * 256]
    for name in names:
        registry.register(name, obj.key, 0, 16)
    assert sorted(s["name"] for s in registry.status()) == sorted(names)
    assert all(p.name.startswith("region-") or p.name == ".lock" for p in registry.records.path.iterdir())


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "empty"),
        ("/", "empty"),
        ("a/b", "one name"),
        ("//x", "one name"),
        ("/../etc/passwd", "one name"),
        ("..", "one name"),
        (".", "one name"),
        ("x\0y", "NUL"),
        ("k" * 256, "longer than 255"),
        ("\udc80bad", "UTF-8"),
        (17, "must be a string"),
    ],
)
def test_keys_that_are_not_one_plain_name_are_refused(registry: SystemSharedMemory, key: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        registry.register("r", key, 0, 8)  # type: ignore[arg-type]
    assert registry.status() == []


def test_a_missing_key_is_not_found(registry: SystemSharedMemory) -> None:
    with pytest.raises(NotFound, match="create it first"):
        registry.register("r", "/encoder-test-does-not-exist", 0, 8)


def test_a_symbolic_link_is_not_followed(registry: SystemSharedMemory, make_shm: MakeShm, tmp_path: Path) -> None:
    target = make_shm(64)
    link = Path("/dev/shm") / f"{target.name}-link"
    os.symlink(target.path, link)
    try:
        with pytest.raises(Forbidden, match="symbolic link"):
            registry.register("r", "/" + link.name, 0, 8)
    finally:
        link.unlink()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_only_regular_files_are_registered(registry: SystemSharedMemory, kind: str) -> None:
    path = Path("/dev/shm") / f"encoder-test-{kind}-{os.getpid()}"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path, 0o600)
    try:
        with pytest.raises(Forbidden, match=r"directory|not a regular file"):
            registry.register("r", path.name, 0, 8)
    finally:
        path.rmdir() if kind == "directory" else path.unlink()


def test_an_object_of_another_user_is_refused(
    registry: SystemSharedMemory, make_shm: MakeShm, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = make_shm(64)
    if os.geteuid() == 0:
        os.chown(obj.path, 65534, 65534)  # really someone else's (root can open it, and must still refuse)
    else:
        monkeypatch.setattr("service.shm.objects.os.geteuid", lambda: os.getuid() + 1)
    with pytest.raises(Forbidden, match="belongs to uid"):
        registry.register("r", obj.key, 0, 8)


@pytest.mark.parametrize(
    ("offset", "byte_size", "error", "message"),
    [
        (0, 0, InvalidInput, "byte_size must be an integer of at least 1"),
        (-1, 8, InvalidInput, "offset must be an integer of at least 0"),
        (0, 1.5, InvalidInput, "byte_size must be"),
        (True, 8, InvalidInput, "offset must be"),
        ("0", 8, InvalidInput, "offset must be"),
        (0, 4097, InvalidInput, "past the end of the shared-memory object"),
        (4000, 97, InvalidInput, "past the end"),
        (0, (1 << 20) + 1, LimitExceeded, "over the limit"),
    ],
)
def test_bad_ranges_are_refused(
    registry: SystemSharedMemory, make_shm: MakeShm, offset: object, byte_size: object, error: type, message: str
) -> None:
    obj = make_shm(4096)
    with pytest.raises(error, match=message):
        registry.register("r", obj.key, offset, byte_size)  # type: ignore[arg-type]
    assert registry.status() == [] and registry.mapped == 0


@pytest.mark.parametrize("name", ["", "x" * 257, "a\0b", 5])
def test_bad_region_names_are_refused(registry: SystemSharedMemory, make_shm: MakeShm, name: object) -> None:
    obj = make_shm(64)
    with pytest.raises(InvalidInput):
        registry.register(name, obj.key, 0, 8)  # type: ignore[arg-type]


def test_a_duplicate_name_is_a_conflict_and_keeps_the_first(registry: SystemSharedMemory, make_shm: MakeShm) -> None:
    first, second = make_shm(64), make_shm(64)
    registry.register("r", first.key, 0, 64)
    with pytest.raises(Conflict, match="already registered"):
        registry.register("r", second.key, 0, 8)
    assert registry.status("r")[0]["key"] == first.key


def test_the_region_count_and_byte_limits(registry: SystemSharedMemory, make_shm: MakeShm) -> None:
    obj = make_shm(1 << 20)
    registry.register("big", obj.key, 0, (1 << 20) - 100)
    with pytest.raises(LimitExceeded, match="would pass the limit of 1048576"):
        registry.register("over", obj.key, 0, 101)
    for i in range(7):  # 8 regions at most (the fixture's limit)
        registry.register(f"r{i}", obj.key, 0, 1)
    with pytest.raises(LimitExceeded, match=r"8 shared-memory regions are registered \(limit 8\)"):
        registry.register("ninth", obj.key, 0, 1)
    registry.unregister("big")
    registry.register("ninth", obj.key, 0, 1000)  # room again once one goes
    assert len(registry.status()) == 8


def test_limit_errors_are_conflicts_so_every_adapter_answers_4xx() -> None:
    assert issubclass(LimitExceeded, Conflict) and issubclass(Conflict, InvalidInput)
    assert issubclass(Forbidden, InvalidInput)


@pytest.mark.parametrize(
    ("ref", "shape", "error", "message"),
    [
        (SharedMemoryRef("nope", 0, 16), (4,), NotFound, "'nope' is registered"),
        (SharedMemoryRef("r", 0, 12), (4,), InvalidInput, "does not match shape"),
        (SharedMemoryRef("r", 0, 20), (4,), InvalidInput, "does not match shape"),
        (SharedMemoryRef("r", 1020, 16), (4,), InvalidInput, "past the end of shared-memory region 'r'"),
        (SharedMemoryRef("r", -4, 16), (4,), InvalidInput, "shared_memory_offset must be"),
        (SharedMemoryRef("r", 0, -16), (4,), InvalidInput, "shared_memory_byte_size must be"),
        (SharedMemoryRef("r", 0, 16), (-4,), InvalidInput, "negative"),
        (SharedMemoryRef("r", 0, 16), (1 << 40, 1 << 40), InvalidInput, "does not match"),
    ],
)
def test_bad_references_are_refused(
    registry: SystemSharedMemory,
    make_shm: MakeShm,
    ref: SharedMemoryRef,
    shape: tuple[int, ...],
    error: type,
    message: str,
) -> None:
    obj = make_shm(4096)
    registry.register("r", obj.key, 0, 1024)
    for method in (registry.input_array, registry.output_array):
        with pytest.raises(error, match=message):
            method(ref, F32, shape)


def test_an_object_truncated_after_registration_is_refused_not_a_crash(
    registry: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(8192)
    registry.register("r", obj.key, 4096, 4096)
    registry.input_array(SharedMemoryRef("r", 0, 16), F32, (4,))
    os.truncate(obj.path, 4096)  # reading the mapping now would be SIGBUS
    with pytest.raises(InvalidInput, match="shrank to 4096 bytes"):
        registry.input_array(SharedMemoryRef("r", 0, 16), F32, (4,))


def test_a_private_registry_removes_its_directory(make_shm: MakeShm) -> None:
    shm = SystemSharedMemory()
    obj = make_shm(64)
    shm.register("r", obj.key, 0, 64)
    path = shm.records.path
    assert path.is_dir()
    shm.close()
    assert not path.exists()
