"""The desktop app (ptth_client_gui.py) on a virtual screen, with a real relay, server and traffic.

Most tests build the app's window in this process and drive it through its
widgets with Tk events (typing into fields, pressing buttons and keys), then
read what the window shows. One runs ptth_client_gui.py as a program and
drives it with xdotool, as a person at the keyboard would. The relay, the
server, ptth_client and the TCP end servers are real processes; the key the
relay learns is the one the app made, from the snippet it shows.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import stat
import subprocess
import sys
import time
import tkinter as tk
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Cluster, Proc, Relay, new_key, tripcode_of, wait_until
from desktop import Display, press, pump, settle, type_into, window_box
from quic_cluster import QuicForwarding
from sshd import Sshd, start_sshd
from tcp_peers import EchoServer, recv_exactly

from ptth_lib.gui.window import ClientWindow

# The app asks the relay again every 10 s while it answers (http_client.RECHECK_SECS); a busy machine adds more.
RELAY_STATE_SECS = 30.0


@pytest.fixture(scope="module")
def display() -> Iterator[Display]:
    d = Display()
    yield d
    d.close()


@dataclass
class Screen:
    """The test's Tk root, handed out in a holder so that teardown can drop the last reference."""

    root: tk.Tk | None


@pytest.fixture
def screen(display: Display) -> Iterator[Screen]:
    """A Tk root on the virtual screen; afterwards destroyed and collected in this thread.

    Tk's objects must be freed in the thread that made them: a Tk interpreter
    collected by a garbage collection that happens to run in another thread (a
    forwarding thread of the app, of this test or a later one) aborts the
    process. So the root's last reference goes here, and gc.collect() frees it.
    """
    holder = Screen(tk.Tk(screenName=display.name, className="ptth-client"))
    yield holder
    root, holder.root = holder.root, None
    assert root is not None
    try:
        root.destroy()
    except tk.TclError:
        pass  # the app closed it
    del root
    gc.collect()


def echo_round_trip(port: int, size: int = 64 * 1024) -> None:
    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        assert recv_exactly(sock, size) == data


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def snippet_for_relay(app: ClientWindow, allow: list[str]) -> str:
    """The [[clients]] table the app shows (on its first run), as the admin pastes it with the allow
    list the admin chose; the dialog is closed, as a person closes it once the text is sent."""
    dialog = app.welcome if hasattr(app, "welcome") and app.welcome.winfo_exists() else app.show_welcome()
    type_into(dialog.name_entry, "alice")
    text = dialog.text.get("1.0", "end-1c")
    dialog.close()
    quoted = ", ".join(f'"{a}"' for a in allow)
    return re.sub(r"allow = \[.*\]", f"allow = [{quoted}]", text)


def add_forward(app: ClientWindow, port: int, server: str, port_name: str) -> None:
    """The Add… button, the three fields typed, Enter."""
    app.add_button.invoke()
    dialog = app.dialog
    type_into(dialog.entries["local_port"], str(port))
    type_into(dialog.entries["server"], server)
    type_into(dialog.entries["port_name"], port_name)
    press(dialog.entries["port_name"], "Return")
    assert not dialog.winfo_exists(), {k: e.cget("text") for k, e in dialog.errors.items()}


def row(app: ClientWindow, port: int) -> tuple[str, str, str, str]:
    """One forward's row as the window shows it: label, state, sent, received."""
    item = app.tree.item(str(port))
    return (item["text"], *item["values"])


def test_first_run_makes_a_key_and_shows_what_to_send_the_admin(display: Display, screen: Screen,
                                                                 tmp_path: Path) -> None:
    tk_root = screen.root
    assert tk_root is not None
    config = tmp_path / "ptth" / "ptth_client.toml"
    app = ClientWindow(tk_root, str(config))
    pump(tk_root, lambda: hasattr(app, "welcome") and app.welcome.winfo_viewable(), "the welcome dialog")
    key_file = tmp_path / "ptth" / "ptth_client.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    welcome = app.welcome
    type_into(welcome.name_entry, "alice")
    text = welcome.text.get("1.0", "end-1c")
    assert f'tripcode = "{tripcode_of(key)}"' in text and 'name = "alice"' in text, text
    assert key not in text  # the key itself is never shown
    settle(tk_root)
    display.screenshot(tmp_path / "desktop-first-run.png", window_box(welcome))
    welcome.copy_button.invoke()
    settle(tk_root)
    assert display.clipboard(tk_root) == text  # what another program pastes
    press(welcome.close_button, "Return")
    # With no relay yet, the relay dialog comes next; a wrong address is explained beside its field.
    pump(tk_root, lambda: hasattr(app, "dialog") and app.dialog.winfo_viewable(), "the relay dialog")
    dialog = app.dialog
    type_into(dialog.entries["address"], "relay example com")
    press(dialog.entries["address"], "Return")
    assert dialog.winfo_exists()
    assert "must be" in dialog.errors["address"].cget("text"), dialog.errors["address"].cget("text")
    port = free_port()  # nothing answers there
    type_into(dialog.entries["address"], f"http://127.0.0.1:{port}")
    press(dialog.entries["address"], "Return")
    assert not dialog.winfo_exists()
    assert f'relay_url = "http://127.0.0.1:{port}"' in config.read_text()
    pump(tk_root, lambda: "cannot reach the relay" in app.status_label.cget("text"), "the relay shown unreachable")
    app.close()


def test_forward_dialog_errors_sit_beside_their_fields(screen: Screen, tmp_path: Path) -> None:
    tk_root = screen.root
    assert tk_root is not None
    config = tmp_path / "ptth_client.toml"
    config.write_text('# my relay\nrelay_url = "http://127.0.0.1:1"\n')
    app = ClientWindow(tk_root, str(config))
    pump(tk_root, lambda: hasattr(app, "welcome"), "the welcome dialog")
    app.welcome.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        app.add_button.invoke()
        dialog = app.dialog
        for port, server, name, field, words in [
            ("99999", "office", "ssh", "local_port", "1"),
            ("x", "office", "ssh", "local_port", "1"),
            (str(busy_port), "office", "ssh", "local_port", "not free"),
            ("2201", "office pc", "ssh", "server", "must be"),
            ("2201", "office", "", "port_name", "must be"),
        ]:
            type_into(dialog.entries["local_port"], port)
            type_into(dialog.entries["server"], server)
            type_into(dialog.entries["port_name"], name)
            press(dialog.entries["port_name"], "Return")
            assert dialog.winfo_exists()
            shown = {k: e.cget("text") for k, e in dialog.errors.items() if e.cget("text")}
            assert list(shown) == [field] and words in shown[field], (port, server, name, shown)
        press(dialog.entries["server"], "Escape")
        assert not dialog.winfo_exists()
    assert app.file.forwards() == []
    assert config.read_text().startswith("# my relay\n")
    app.close()


@dataclass
class Tunnel:
    cluster: Cluster
    relay: Relay
    sshd: Sshd


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[Tunnel]:
    """A relay with server alpha forwarding echo and ssh; the app's [[clients]] table is added by the test."""
    c = Cluster(tmp_path)
    echo = EchoServer()
    sshd = start_sshd(c, tmp_path / "sshd")
    key = new_key("alpha")
    relay = c.relay({"alpha": key})
    root = tmp_path / "root"
    root.mkdir()
    c.server(relay, "alpha", key, root,
             extra_config=f'[forwarded_ports]\necho = "127.0.0.1:{echo.port}"\nssh = "127.0.0.1:{sshd.port}"\n')
    yield Tunnel(c, relay, sshd)
    c.close()
    echo.close()


def test_forwards_carry_traffic_and_the_window_follows_the_relay(display: Display, screen: Screen,
                                                                   tmp_path: Path, tunnel: Tunnel) -> None:
    tk_root = screen.root
    assert tk_root is not None
    c, relay = tunnel.cluster, tunnel.relay
    config = tmp_path / "client" / "ptth_client.toml"
    config.parent.mkdir()
    config.write_text("# Written by hand; the app keeps this comment.\n"
                      f'relay_url = "{relay.url}"  # the office relay\n')
    app = ClientWindow(tk_root, str(config))
    pump(tk_root, lambda: hasattr(app, "welcome"), "the welcome dialog")
    # The admin adds the table the app shows, and reloads the relay.
    relay.config.write_text(relay.config.read_text() + snippet_for_relay(app, ["alpha:echo", "alpha:ssh"]))
    pump(tk_root, lambda: app.status_label.cget("text").startswith("Connected as"), "connected",
         RELAY_STATE_SECS)
    echo_port, ssh_port = free_port(), free_port()
    add_forward(app, echo_port, "alpha", "echo")
    add_forward(app, ssh_port, "alpha", "ssh")
    pump(tk_root, lambda: row(app, echo_port)[1] == "Listening", "the echo forward listening")

    # Traffic: an echo conversation held open, and a real ssh login through the second forward.
    with socket.create_connection(("127.0.0.1", echo_port), timeout=20) as held:
        for i in range(20):  # over a few seconds, so that the graph has a shape
            data = os.urandom(128 * 1024 * (1 + i % 5))
            held.sendall(data)
            assert recv_exactly(held, len(data)) == data
            settle(tk_root, 0.15)
        pump(tk_root, lambda: row(app, echo_port)[1].startswith("1 connection open"), "1 connection open")
        out = subprocess.run(tunnel.sshd.ssh(ssh_port, "echo", "through the desktop app"), capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.stdout == "through the desktop app\n", out.stderr
        settle(tk_root, 1.2)
        label, _, sent, received = row(app, echo_port)
        assert label == f"127.0.0.1:{echo_port}  →  alpha : echo"
        assert sent == received == "7.5 MiB", (sent, received)
        assert row(app, ssh_port)[2] != "0 B"
        display.screenshot(tmp_path / "desktop-connected.png", window_box(app.root))

    # The relay goes away: the window says so, at the latest at the next check, at once when a program
    # tries a forward. It comes back: the window recovers as soon as a forward gets through again.
    relay.proc.stop()
    assert not _echo_works(echo_port)
    pump(tk_root, lambda: "Not connected: cannot reach the relay" in app.status_label.cget("text"),
         "the relay shown down")
    assert app.dot.cget("style") == "Bad.TLabel"
    settle(tk_root)
    display.screenshot(tmp_path / "desktop-relay-down.png", window_box(app.root))
    c.start_relay(relay.config, relay.port)
    wait_until(lambda: _echo_works(echo_port), "the echo forward working again", deadline=RELAY_STATE_SECS)
    pump(tk_root, lambda: app.status_label.cget("text") == "Connected as “alice”", "connected again")

    # Stop and start one forward from the window.
    app.tree.selection_set(str(echo_port))
    app.stop_button.invoke()
    assert not listening(echo_port) and row(app, echo_port)[1] == "Stopped"
    app.start_button.invoke()
    echo_round_trip(echo_port)
    app.copy_button.invoke()
    settle(tk_root)
    assert display.clipboard(tk_root) == f"127.0.0.1:{echo_port}"

    # Closing the window closes everything, open connections too; ptth_client.py reads the file the app
    # wrote and forwards the same ports.
    with socket.create_connection(("127.0.0.1", echo_port), timeout=20) as held:
        held.sendall(b"open\n")
        assert recv_exactly(held, 5) == b"open\n"
        app.close()
        assert not listening(echo_port) and not listening(ssh_port)
        try:
            assert held.recv(1) == b""
        except ConnectionResetError:
            pass  # cut: the app resets a forwarded connection it closes
    text = config.read_text()
    assert text.startswith("# Written by hand; the app keeps this comment.\n") and "# the office relay" in text
    client = Proc([sys.executable, "ptth_client.py", "--config", str(config)], tmp_path / "cli.log")
    c.procs.append(client)
    client.wait_for_output(rf"forwarding 127\.0\.0\.1:{echo_port} to alpha:echo\b")
    client.wait_for_output(rf"forwarding 127\.0\.0\.1:{ssh_port} to alpha:ssh\b")
    echo_round_trip(echo_port)


def _echo_works(port: int) -> bool:
    try:
        echo_round_trip(port, 1000)
    except OSError:
        return False
    return True


def test_forwarding_over_quic(display: Display, screen: Screen, tmp_path: Path) -> None:
    tk_root = screen.root
    assert tk_root is not None
    echo = EchoServer()
    fw = QuicForwarding(tmp_path, {"echo": echo.port}, ["alpha:echo"], [])
    try:
        fw.start_relay()
        fw.start_server()
        config = tmp_path / "ptth_client.toml"
        key_file = tmp_path / "key"
        key_file.write_text(fw.client_key + "\n")
        key_file.chmod(0o600)
        port = free_port()
        config.write_text(f'quic_relay = "127.0.0.1:{fw.relay_port}"\nrelay_fingerprint = "{"0" * 64}"\n'
                          f'name = "laptop"\napi_key_file = "{key_file}"\nforward = ["{port}:alpha:echo"]\n')
        app = ClientWindow(tk_root, str(config))
        # A pinned fingerprint that is not the relay's: said in the window, the key never sent.
        pump(tk_root, lambda: f"has certificate {fw.fingerprint}" in app.status_label.cget("text"),
             "the fingerprint mismatch")
        assert "0" * 64 in app.fingerprint_label.cget("text")
        dialog = app.edit_relay()
        type_into(dialog.entries["fingerprint"], fw.fingerprint)
        press(dialog.entries["fingerprint"], "Return")
        assert not dialog.winfo_exists()
        pump(tk_root, lambda: app.status_label.cget("text") == "Connected as “laptop”", "connected over QUIC")
        assert fw.fingerprint in app.fingerprint_label.cget("text")
        echo_round_trip(port, 1024 * 1024)
        pump(tk_root, lambda: row(app, port)[2] == "1.0 MiB", "the bytes counted")
        app.close()
        assert not listening(port)
    finally:
        fw.close()
        echo.close()


def test_the_program_at_the_keyboard_at_200_percent(tmp_path: Path, tunnel: Tunnel) -> None:
    """ptth_client_gui.py as a program on a 192 dpi screen: a forward added with the keyboard, then Ctrl+Q."""
    c, relay = tunnel.cluster, tunnel.relay
    big = Display(dpi=192, size="1920x1200")
    try:
        config = tmp_path / "ptth_client.toml"
        key = new_key("laptop")
        key_file = tmp_path / "ptth_client.key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        config.write_text(f'relay_url = "{relay.url}"\napi_key_file = "{key_file}"\n')
        relay.config.write_text(relay.config.read_text() + f'[[clients]]\nname = "laptop"\n'
                                f'tripcode = "{tripcode_of(key)}"\nallow = ["alpha:echo"]\n')
        app = Proc([sys.executable, "ptth_client_gui.py", "--config", str(config)], tmp_path / "gui.log",
                   env=big.env())
        c.procs.append(app)
        app.wait_for_output(r"connected to relay .* as client 'laptop'", RELAY_STATE_SECS)
        window = big.xdotool("search", "--sync", "--name", "^PTTH client$").split()[0]
        big.xdotool("windowfocus", "--sync", window)
        port = free_port()
        big.xdotool("key", "ctrl+n")  # the dialog opens with the suggested port selected: typing replaces it
        time.sleep(0.5)
        big.xdotool("type", "--delay", "20", f"{port}\talpha\techo")
        big.xdotool("key", "Return")
        app.wait_for_output(rf"forwarding 127\.0\.0\.1:{port} to alpha:echo\b")
        echo_round_trip(port)
        assert f'forward = ["{port}:alpha:echo"]' in config.read_text()
        time.sleep(1.0)  # one refresh shows the traffic
        geometry = big.xdotool("getwindowgeometry", "--shell", window)
        g = dict(line.split("=") for line in geometry.split())
        x, y, w, h = (int(g[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
        shot = big.screenshot(tmp_path / "desktop-200-percent.png", (x, y, x + w, y + h))
        assert shot.stat().st_size > 0
        big.xdotool("key", "ctrl+q")
        assert app.popen.wait(20) == 0
        assert not listening(port)
    finally:
        big.close()


def test_rows_say_why_a_forward_does_not_work(screen: Screen, tmp_path: Path, tunnel: Tunnel) -> None:
    """A busy local port, a forward the relay does not allow, a port the server does not forward."""
    tk_root = screen.root
    assert tk_root is not None
    c, relay = tunnel.cluster, tunnel.relay
    key = new_key("laptop")
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    relay.config.write_text(relay.config.read_text() + f'[[clients]]\nname = "laptop"\n'
                            f'tripcode = "{tripcode_of(key)}"\nallow = ["alpha:echo", "alpha:nosuch"]\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port, denied_port, missing_port = busy.getsockname()[1], free_port(), free_port()
        config = tmp_path / "ptth_client.toml"
        config.write_text(f'relay_url = "{relay.url}"\napi_key_file = "{key_file}"\n'
                          f'forward = ["{busy_port}:alpha:echo", "{denied_port}:alpha:ssh", '
                          f'"{missing_port}:alpha:nosuch"]\n')
        app = ClientWindow(tk_root, str(config))
        pump(tk_root, lambda: app.status_label.cget("text") == "Connected as “laptop”", "connected",
             RELAY_STATE_SECS)
        assert row(app, busy_port)[1].startswith(f"cannot listen on 127.0.0.1:{busy_port}: ")
        assert app.tree.item(str(busy_port))["tags"] == ["problem"]  # shown in the error colour
        assert row(app, denied_port)[1] == "The relay does not allow this forward: ask your admin"
        with socket.create_connection(("127.0.0.1", missing_port), timeout=20) as sock:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        pump(tk_root, lambda: row(app, missing_port)[1].startswith("refused: 502 server 'alpha'"),
             "the relay's refusal in the row")
        app.close()
    for proc in c.procs:  # the relay and the server took it in their stride
        proc.check_alive()
