"""`SharedOrExclusive`, the gate that keeps an edited request's weights from every other request: it excludes, and
neither a stream of edited requests nor a stream of plain ones starves the other side."""

from __future__ import annotations

import threading
import time

from trustray.actors.chat import SharedOrExclusive


def _loop(gate: SharedOrExclusive, side: str, stop: threading.Event, inside: list[str], errors: list[str]) -> None:
    while not stop.is_set():
        with getattr(gate, side)():
            inside.append(side)
            if side == "exclusive" and inside.count("exclusive") + inside.count("shared") != 1:
                errors.append(f"exclusive block shared the gate with {list(inside)}")
            time.sleep(0.002)
            inside.remove(side)


def test_exclusive_blocks_in_a_row_do_not_starve_shared_holders():
    gate, stop, inside, errors = SharedOrExclusive(), threading.Event(), [], []
    editor = threading.Thread(target=_loop, args=(gate, "exclusive", stop, inside, errors))
    editor.start()
    done = []

    def plain() -> None:
        for _ in range(5):
            with gate.shared():
                time.sleep(0.002)
        done.append(1)

    readers = [threading.Thread(target=plain) for _ in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=10)
    stop.set()
    editor.join()
    assert len(done) == 4 and not errors


def test_shared_holders_in_a_row_do_not_starve_an_exclusive_one():
    gate, stop, inside, errors = SharedOrExclusive(), threading.Event(), [], []
    readers = [threading.Thread(target=_loop, args=(gate, "shared", stop, inside, errors)) for _ in range(4)]
    for reader in readers:
        reader.start()
    entered = threading.Event()

    def edit() -> None:
        with gate.exclusive():
            if inside:
                errors.append(f"shared holders inside an exclusive block: {list(inside)}")
            entered.set()

    editor = threading.Thread(target=edit)
    editor.start()
    assert entered.wait(timeout=10)
    stop.set()
    for thread in (editor, *readers):
        thread.join()
    assert not errors
