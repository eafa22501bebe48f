"""The deployment patches of flwr 1.42 internals (runtime/flower_patches.py): they change what they say, and only
that."""

from __future__ import annotations

import threading

import pytest

from runtime import flower_patches as fp


def test_object_pulls_retry_after_milliseconds_with_the_same_deadline():
    from flwr.supercore import constant
    from flwr.supercore.inflatable import inflatable_utils as iu

    saved = {fn: dict(fn.__kwdefaults__) for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree)}
    try:
        fp.install_fast_object_pulls()
        for fn in saved:
            d = fn.__kwdefaults__
            assert d["initial_backoff"] == 0.005 and d["backoff_cap"] == 0.5
            # giving up on a sender that died mid-upload takes as long as with Flower's own 1 s … 10 s waits
            assert d["max_tries_per_object"] * d["backoff_cap"] == pytest.approx(
                constant.PULL_MAX_TRIES_PER_OBJECT * constant.PULL_BACKOFF_CAP)
        calls = []

        def pull(object_id: str) -> bytes:  # not uploaded yet for the first three tries
            calls.append(object_id)
            if len(calls) <= 3:
                raise iu.ObjectUnavailableError(object_id)
            return b"content"

        assert iu.pull_objects(["a"], pull) == {"a": b"content"}
        assert calls == ["a"] * 4
        # the provider bounds it by its step-timeout: a user killed mid-upload costs one timeout, not 5,000 s
        fp.install_fast_object_pulls(give_up_after=180.0)
        for fn in saved:
            d = fn.__kwdefaults__
            assert d["max_tries_per_object"] * d["backoff_cap"] == pytest.approx(180.0)
    finally:
        for fn, d in saved.items():
            fn.__kwdefaults__.update(d)


def test_supernode_learns_the_gap_to_the_next_message_and_polls_within_its_cap(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(fp._time, "monotonic", lambda: now[0])
    clock = fp._NodeTime(cap=0.5, reply=0.01)
    # nothing learned yet: 20 ms growing ×1.3, never above the cap
    waits = [clock.idle_wait() for _ in range(20)]
    assert waits[0] == pytest.approx(0.02) and waits[1] == pytest.approx(0.026)
    assert max(waits) == 0.5 and waits == sorted(waits)
    # the provider's next message came 0.6 s after our reply
    clock.replied()
    now[0] += 0.6
    clock.received()
    assert clock.gap == pytest.approx(0.6)
    # next time: sleep through most of that gap in one go, then poll finely again
    clock.replied()
    now[0] += 0.01
    assert clock.idle_wait() == pytest.approx(0.7 * 0.6 - 0.01)
    assert clock.idle_wait() == pytest.approx(0.026)
    # Flower's reply poll (0.5 s) becomes 10 ms; its idle sleep (3 s) becomes ours
    slept = []
    monkeypatch.setattr(fp._time, "sleep", slept.append)
    clock.sleep(0.5)
    clock.sleep(3)
    assert slept[0] == 0.01 and 0 < slept[1] <= 0.5


def test_the_superexec_wakes_when_the_supernode_stores_a_message(tmp_path):
    fifo, wake = fp.make_superexec_waker(str(tmp_path))
    assert (tmp_path / "superexec.wake").stat().st_mode & 0o777 == 0o600
    clock = fp._WakeTime(fifo, cap=120)  # idle polling so slow that only a wake-up can end the sleep in time
    wake()
    sleeper = threading.Thread(target=clock.sleep, args=(0.02,), daemon=True)
    sleeper.start()
    sleeper.join(timeout=60)
    assert not sleeper.is_alive(), "the SuperExec slept through the SuperNode's wake-up"
    # more wake-ups than the pipe holds (64 KiB): the SuperNode never blocks on a busy SuperExec
    for _ in range(70_000):
        wake()


def test_dispatch_finds_each_nodes_next_message_in_one_pass_as_flowers_per_node_loop_would():
    """Simulation dispatch: per node, the first undelivered message still valid after Flower's own check, in the
    store's order, stamped delivered; delivered messages, other nodes' and expired ones are not sent."""
    from types import SimpleNamespace

    def message(node, delivered=""):
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=delivered))

    store = {"a": message(1, "earlier"), "b": message(1), "c": message(1), "d": message(2), "e": message(3),
             "x": message(2)}
    checked = []

    class State:
        lock = threading.RLock()
        message_ins_store = store

        def _check_stored_messages(self, ids):
            checked.extend(ids)
            if "d" in ids:  # expired: Flower's check deletes it
                del store["d"]

    sent = fp._next_message_per_node(State(), {1, 2})
    assert sent == [store["b"], store["x"]]
    assert all(m.metadata.delivered_at not in ("", "earlier") for m in sent)
    assert store["c"].metadata.delivered_at == "" and store["e"].metadata.delivered_at == ""
    assert "a" not in checked and "e" not in checked and "d" not in store
    assert fp._next_message_per_node(State(), {1, 2}) == [store["c"]]  # the next pass: node 1's next one


def _fab(extra: bytes = b"") -> bytes:
    """A FAB as `flwr build` makes one: the app's pyproject.toml, one module and the .info/CONTENT hash list."""
    import hashlib
    import io
    import zipfile
    from pathlib import Path

    files = {"pyproject.toml": (Path(__file__).resolve().parents[1] / "pyproject.toml").read_bytes(),
             "sims/extra.py": b"X = 1\n" + extra}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(".info/CONTENT", "".join(f"{n},{hashlib.sha256(d).hexdigest()},{len(d)}\n"
                                            for n, d in files.items()))
    return out.getvalue()


def test_a_fab_is_unpacked_once_per_node_and_anything_unusual_goes_to_flower(tmp_path, monkeypatch):
    import shutil

    from flwr.supernode.runtime import run_clientapp

    home = tmp_path / "home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    flower_install = run_clientapp.install_from_fab
    installs = []

    def counted(fab_file, *args, **kwargs):  # Flower's own install (unpack, verify, copy), counted
        installs.append(fab_file)
        return flower_install(fab_file, *args, **kwargs)

    monkeypatch.setattr(run_clientapp, "install_from_fab", counted)
    fp.install_fab_once()
    install = run_clientapp.install_from_fab
    one, two = _fab(), _fab(b"Y = 2\n")
    first = install(one, skip_prompt=True)
    assert first.is_dir() and (first / "sims" / "extra.py").read_bytes() == b"X = 1\n"
    assert install(one, skip_prompt=True) == first and len(installs) == 1  # not unpacked again
    assert install(two, skip_prompt=True) != first and len(installs) == 2  # other bytes: Flower installs them
    shutil.rmtree(first)  # the install directory went: installed again, not trusted from the marker
    assert install(one, skip_prompt=True) == first and first.is_dir() and len(installs) == 3
    moved = tmp_path / "moved"  # FLWR_HOME copied elsewhere with its markers, the app not: Flower installs
    shutil.copytree(home / "apps" / ".ppflower-installed", moved / "apps" / ".ppflower-installed")
    monkeypatch.setenv("FLWR_HOME", str(moved))
    assert install(one, skip_prompt=True).is_relative_to(moved) and len(installs) == 4
    monkeypatch.setenv("FLWR_HOME", str(home))
    markers = home / "apps" / ".ppflower-installed"  # no place for markers (a read-only home, say): no cache,
    shutil.rmtree(markers)  # every message installs through Flower, as without the patch, and nothing fails
    markers.write_text("not a directory")
    assert install(one, skip_prompt=True) == first and install(one, skip_prompt=True) == first
    assert len(installs) == 6
    fp.install_fab_once()  # installing the patch twice wraps once
    assert run_clientapp.install_from_fab is install
