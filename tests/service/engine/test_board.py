"""The engine board: one writer (the supervisor), readers in other processes that see its changes at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

from service.engine.board import EngineBoard, Slot
from service.engine.devices import DeviceStatus


def test_a_created_board_lists_devices_and_sockets_all_down(tmp_path: Path) -> None:
    board = EngineBoard.create(str(tmp_path), ["0", "1"])
    assert board.devices == ["0", "1"]
    assert board.sockets == [str(tmp_path / "engine-0.sock"), str(tmp_path / "engine-1.sock")]
    assert board.slots() == [Slot(False, 0, 0), Slot(False, 0, 0)]
    assert json.loads((tmp_path / "engines.json").read_text())["devices"] == ["0", "1"]
    assert not (tmp_path / "engines.json.new").exists()


def test_readers_see_the_writers_changes(tmp_path: Path) -> None:
    writer = EngineBoard.create(str(tmp_path), ["cpu0", "cpu1"])
    reader = EngineBoard(str(tmp_path))  # as a worker opens it: read-only
    writer.write(1, Slot(True, 3, 2))
    assert reader.read(1) == Slot(True, 3, 2) and reader.read(0) == Slot(False, 0, 0)
    assert reader.status() == [DeviceStatus("cpu0", False, 0), DeviceStatus("cpu1", True, 2)]
    writer.write(1, Slot(False, 3, 2))
    assert reader.status()[1] == DeviceStatus("cpu1", False, 2)
    reader.close()
    writer.close()


def test_socket_paths_may_lie_elsewhere(tmp_path: Path) -> None:
    board = EngineBoard.create(str(tmp_path), ["cpu"], sockets=["/run/engine.sock"])
    assert board.sockets == ["/run/engine.sock"] and os.path.isabs(board.sockets[0])
