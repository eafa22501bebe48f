"""The private channel between a user's ClientApp processes and its trainer (pp_flower.channel)."""

from __future__ import annotations

import os
import stat
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest

from pp_flower import protocol
from pp_flower.channel import TrainerClient, TrainerServer, make_secret, owner_only_socket
from tests.test_live_users import _meta


@pytest.fixture
def served(tmp_path, splits):
    from pp_flower.user import UserTrainer

    private = tmp_path / "private"
    secret = make_secret(private / "secret")
    server = TrainerServer(UserTrainer(num_threads=1), private / "trainer.sock", secret)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ids = {"train": splits.train_ids[:16].numpy(), "val": splits.val_ids[:8].numpy(),
           "test": splits.test_ids[:8].numpy()}
    yield server, secret, ids
    server.close()


def test_channel_is_owner_only_and_refuses_a_connection_without_the_secret(served, tmp_path):
    server, secret, _ = served
    assert owner_only_socket(server.path)
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.path.parent / "secret").st_mode) == 0o600
    with pytest.raises(AuthenticationError):  # a wrong secret: refused before any request is read
        Client(str(server.path), family="AF_UNIX", authkey=b"x" * 32)
    # no secret at all: the server opens with its HMAC challenge, takes the request for a wrong answer to it, says
    # so and hangs up — the request is never served
    conn = Client(str(server.path), family="AF_UNIX")
    conn.send(("ping", ()))
    assert conn.recv_bytes().startswith(b"#CHALLENGE#")
    assert conn.recv_bytes() == b"#FAILURE#"
    with pytest.raises((EOFError, ConnectionError)):
        conn.recv_bytes()
    assert TrainerClient(server.path, secret, 30).request("ping") == "pong"  # the node's own processes get in
    assert server.refused >= 1


def test_channel_refuses_a_message_for_another_user_and_an_unknown_call(served, tmp_path):
    server, secret, ids = served
    client = TrainerClient(server.path, secret, 120)
    info = client.setup("key-0", _meta(tmp_path, 0), ids, False)
    assert info["n-train"] == 16 and info["step"] == 0
    reply = client.call("key-0", 0, "step", {"grad-step": protocol.NO_INDEX, "want": 0}, {})
    assert reply["protected"]["xhat"].shape == (16, 3, 32, 32)
    with pytest.raises(RuntimeError, match="refused: a message for user 1 carried user 0's key"):
        client.call("key-0", 1, "step", {"grad-step": protocol.NO_INDEX, "want": 0}, {})
    with pytest.raises(RuntimeError, match=protocol.NOT_SET_UP):
        client.call("someone-elses-key", 0, "step", {"grad-step": protocol.NO_INDEX, "want": 0}, {})
    with pytest.raises(RuntimeError, match="unknown call"):
        client.request("_user", "key-0")  # private methods are not callable over the channel
