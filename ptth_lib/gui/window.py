"""The desktop app's main window: the relay and whether it answers, one row per forward, and the buttons.

The window owns a `ClientFile` (the TOML file ptth_client.py --config reads,
edited with its comments kept) and a `ForwardingClient` (forward/client.py:
the same forwarding code as the command line, its transport running beside
the window). Every REFRESH_MS it reads the client's tallies and the relay's
state and redraws the rows; nothing else runs on the window's thread.
"""

from __future__ import annotations

import getpass
import logging
import socket
import time
import tkinter as tk
from functools import partial
from tkinter import font as tkfont
from tkinter import ttk

from ptth_lib.config import Forward, load_client_config
from ptth_lib.config.client_file import ClientFile, RelaySettings, clients_snippet
from ptth_lib.errors import ConfigError
from ptth_lib.forward.client import (
    ClientError,
    ForwardingClient,
    ForwardState,
    RelayState,
    is_allowed,
    listening_socket,
)
from ptth_lib.gui.dialogs import Field, FieldDialog, TripcodeDialog
from ptth_lib.gui.traffic import Traffic, rate_text, size_text
from ptth_lib.wire import names, tripcode

logger = logging.getLogger(__name__)

# How often the rows and the relay's state are redrawn: live enough for a graph, idle otherwise.
REFRESH_MS = 500

# Colours that read on light themes and for the common colour blindnesses (blue/orange, not red/green alone:
# every state also says itself in words).
GOOD, BAD, NEUTRAL, GRAPH, GRAPH_BACKGROUND = "#1a7f37", "#b3261e", "#6b6b6b", "#2f6fb0", "#e3e9f1"

# Pixels between a row's graph and its text (the image is that much wider, transparent there).
GRAPH_GAP = 8


class ClientWindow:
    """The app: build with a Tk root and a config path, then run root.mainloop()."""

    def __init__(self, root: tk.Tk, config_path: str) -> None:
        self.root = root
        self.file = ClientFile.load(config_path)
        self.client: ForwardingClient | None = None
        self.config_problem = ""  # why there is no client: the CLI's own one-line error
        self.stopped: set[int] = set()  # local ports the user stopped (in this session)
        self.traffic: dict[int, Traffic] = {}
        self.images: dict[int, tk.PhotoImage] = {}
        self.closed = False
        self._style()
        self._build()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.bind_all("<Control-q>", lambda _: self.close())
        key, created = self.file.ensure_key()
        self.key = key
        if created:
            self.file.save()
        self._start_client()
        self._refresh()
        if created or not self._relay_set():
            root.after(100, lambda: self.show_welcome(first_run=created))

    # The window

    def _style(self) -> None:
        style = ttk.Style(self.root)
        if "clam" in style.theme_names():
            style.theme_use("clam")
        base = tkfont.nametofont("TkDefaultFont")
        self.line = base.metrics("linespace")  # everything sized from the font: readable at any scaling
        style.configure("Treeview", rowheight=int(self.line * 1.6))
        style.configure("Error.TLabel", foreground=BAD)
        style.configure("Hint.TLabel", foreground=NEUTRAL)
        style.configure("Good.TLabel", foreground=GOOD)
        style.configure("Bad.TLabel", foreground=BAD)
        style.configure("Neutral.TLabel", foreground=NEUTRAL)
        heading = base.actual()
        style.configure("Title.TLabel", font=(heading["family"], heading["size"] + 2, "bold"))
        self.root.title("PTTH client")
        self.root.minsize(int(self.line * 34), int(self.line * 16))

    def _build(self) -> None:
        root = self.root
        root.columnconfigure(0, weight=1)
        root.rowconfigure(1, weight=1)
        pad = "8p"

        relay = ttk.Frame(root, padding=pad)
        relay.grid(row=0, column=0, sticky="we")
        relay.columnconfigure(1, weight=1)
        ttk.Label(relay, text="Relay", style="Title.TLabel").grid(row=0, column=0, sticky="w", padx=(0, pad))
        self.relay_label = ttk.Label(relay, text="")
        self.relay_label.grid(row=0, column=1, sticky="w")
        self.dot = ttk.Label(relay, text="●", style="Neutral.TLabel")
        self.dot.grid(row=1, column=0, sticky="e", padx=(0, pad))
        self.status_label = ttk.Label(relay, text="", wraplength=int(self.line * 30), justify="left")
        self.status_label.grid(row=1, column=1, sticky="w")
        self.fingerprint_label = ttk.Label(relay, text="", style="Hint.TLabel")
        self.fingerprint_label.grid(row=2, column=1, sticky="w")
        self.relay_button = ttk.Button(relay, text="Relay settings…", underline=0, command=self.edit_relay)
        self.relay_button.grid(row=0, column=2, sticky="e")
        self.tripcode_button = ttk.Button(relay, text="My tripcode…", underline=1, command=self.show_welcome)
        self.tripcode_button.grid(row=1, column=2, sticky="e", pady=("4p", 0))

        table = ttk.Frame(root, padding=(pad, 0))
        table.grid(row=1, column=0, sticky="nsew")
        table.columnconfigure(0, weight=1)
        table.rowconfigure(0, weight=1)
        columns = ("state", "up", "down")
        self.tree = ttk.Treeview(table, columns=columns, selectmode="browse", height=6)
        self.tree.heading("#0", text="Forward", anchor="w")
        self.tree.heading("state", text="State", anchor="w")
        self.tree.heading("up", text="Sent", anchor="e")
        self.tree.heading("down", text="Received", anchor="e")
        self.tree.column("#0", width=int(self.line * 20), stretch=True)
        self.tree.column("state", width=int(self.line * 12), stretch=True)
        self.tree.column("up", width=int(self.line * 6), anchor="e", stretch=False)
        self.tree.column("down", width=int(self.line * 6), anchor="e", stretch=False)
        self.tree.tag_configure("problem", foreground=BAD)
        self.tree.tag_configure("stopped", foreground=NEUTRAL)
        self.tree.grid(row=0, column=0, sticky="nsew")
        scroll = ttk.Scrollbar(table, orient="vertical", command=self.tree.yview)
        scroll.grid(row=0, column=1, sticky="ns")
        self.tree.configure(yscrollcommand=scroll.set)
        self.empty_label = ttk.Label(table, text="No forwards yet: press Add… to reach a port of a server.",
                                     style="Hint.TLabel")
        self.tree.bind("<<TreeviewSelect>>", lambda _: self._update_buttons())
        self.tree.bind("<Return>", lambda _: self.edit_forward())
        self.tree.bind("<Double-1>", lambda _: self.edit_forward())
        self.tree.bind("<Delete>", lambda _: self.remove_forward())
        self.tree.bind("<space>", lambda _: self.toggle_forward())

        buttons = ttk.Frame(root, padding=pad)
        buttons.grid(row=2, column=0, sticky="we")
        self.add_button = ttk.Button(buttons, text="Add…", underline=0, command=self.add_forward)
        self.edit_button = ttk.Button(buttons, text="Edit…", underline=0, command=self.edit_forward)
        self.remove_button = ttk.Button(buttons, text="Remove", underline=2, command=self.remove_forward)
        self.start_button = ttk.Button(buttons, text="Start", underline=1, command=self.start_forward)
        self.stop_button = ttk.Button(buttons, text="Stop", underline=2, command=self.stop_forward)
        self.copy_button = ttk.Button(buttons, text="Copy address", underline=0, command=self.copy_address)
        for b in (self.add_button, self.edit_button, self.remove_button, self.start_button, self.stop_button):
            b.pack(side="left", padx=(0, "4p"))
        self.copy_button.pack(side="right")
        self.message = ttk.Label(root, text="", style="Hint.TLabel", padding=(pad, 0, pad, pad))
        self.message.grid(row=3, column=0, sticky="we")

        # Alt + the underlined letter, as the buttons show it.
        for key, button in (("a", self.add_button), ("e", self.edit_button), ("m", self.remove_button),
                            ("t", self.start_button), ("o", self.stop_button), ("c", self.copy_button),
                            ("r", self.relay_button), ("y", self.tripcode_button)):
            root.bind(f"<Alt-{key}>", partial(_invoke, button))  # the main window's widgets only
        root.bind("<Control-n>", lambda _: self.add_forward())
        self.tree.bind("<Control-c>", lambda _: self.copy_address())
        self.tree.focus_set()

    # The forwarding client

    def _relay_set(self) -> bool:
        r = self.file.relay()
        return bool(r.relay_url or r.quic_relay)

    def _start_client(self) -> None:
        """(Re)start forwarding from the saved file; a config the CLI would refuse shows its error."""
        self._stop_client()
        if not self._relay_set():
            self.config_problem = "No relay yet: press Relay settings… and type the address your admin gave you."
            return
        try:
            config = load_client_config(self.file.path, {}, forwards_required=False)
            self.client = ForwardingClient(config, background=True)
        except ConfigError as e:
            self.config_problem = str(e)
            return
        self.config_problem = ""
        self.client.proxy.connect()
        for f in config.forwards:
            if f.local_port not in self.stopped:
                self._open(f)

    def _stop_client(self) -> None:
        if self.client is not None:
            self.client.stop()
            self.client = None

    def _open(self, forward: Forward) -> None:
        if self.client is None:
            return
        try:
            self.client.open(forward)
        except ClientError as e:
            self.say(str(e))

    def close(self) -> None:
        """Close every forwarded connection and port, then the window."""
        if self.closed:
            return
        self.closed = True
        self._stop_client()
        self.images.clear()  # Tk images go with their interpreter, in this thread: never in a later GC
        self.root.destroy()

    # Redrawing

    def _refresh(self) -> None:
        if self.closed:
            return
        self._show_relay()
        self._show_forwards()
        self.root.after(REFRESH_MS, self._refresh)

    def relay_state(self) -> RelayState:
        return self.client.proxy.relay_state() if self.client is not None else RelayState(False, self.config_problem)

    def _show_relay(self) -> None:
        r = self.file.relay()
        if r.quic_relay:
            self.relay_label.configure(text=f"{r.quic_relay} (QUIC)")
            pin = f"certificate SHA-256 {r.relay_fingerprint}" if r.relay_fingerprint else f"CA file {r.ca_file}"
            self.fingerprint_label.configure(text=pin)
        else:
            self.relay_label.configure(text=r.relay_url or "not set")
            self.fingerprint_label.configure(text="")
        state = self.relay_state()
        if state.connected:
            text, style = f"Connected as “{state.client_name}”", "Good.TLabel"
        elif state.connected is None:
            text, style = "Connecting…", "Neutral.TLabel"
        else:
            text, style = f"Not connected: {state.problem}", "Bad.TLabel"
        self.dot.configure(style=style)
        self.status_label.configure(text=text)

    def forward_states(self) -> dict[int, ForwardState]:
        return self.client.states() if self.client is not None else {}

    def _show_forwards(self) -> None:
        forwards = self.file.forwards()
        states = self.forward_states()
        allowed = self.relay_state().allowed
        now = time.monotonic()
        wanted = [str(f.local_port) for f in forwards]
        for iid in self.tree.get_children():
            if iid not in wanted:
                self.tree.delete(iid)
                self.traffic.pop(int(iid), None)
                self.images.pop(int(iid), None)
        for index, f in enumerate(forwards):
            iid = str(f.local_port)
            state = states.get(f.local_port)
            traffic = self.traffic.setdefault(f.local_port, Traffic())
            traffic.sample(now, state.bytes_up if state else 0, state.bytes_down if state else 0)
            text, tag = self._state_text(f, state, allowed)
            rate = rate_text(traffic.rate_up + traffic.rate_down)
            values = (text + (f" · {rate}" if rate else ""), size_text(state.bytes_up if state else 0),
                      size_text(state.bytes_down if state else 0))
            label = f"{self._address(f)}  →  {f.server} : {f.port}"
            image = self._graph(f.local_port, traffic)
            if self.tree.exists(iid):
                self.tree.item(iid, text=label, values=values, tags=(tag,), image=image)
                self.tree.move(iid, "", index)
            else:
                self.tree.insert("", index, iid=iid, text=label, values=values, tags=(tag,), image=image)
        if forwards:
            self.empty_label.place_forget()
        else:
            self.empty_label.place(relx=0.5, rely=0.5, anchor="center")
        self._update_buttons()

    def _state_text(self, f: Forward, state: ForwardState | None, allowed: frozenset[str] | None) -> tuple[str, str]:
        if f.local_port in self.stopped:
            return "Stopped", "stopped"
        if state is None:
            return ("Not started: " + self.config_problem if self.config_problem else "Not started"), "problem"
        if not state.listening:
            return state.problem, "problem"
        if state.open:
            return f"{state.open} connection{'s' if state.open != 1 else ''} open", ""
        if not is_allowed(allowed, f):
            return "The relay does not allow this forward: ask your admin", "problem"
        if state.problem:
            return state.problem, "problem"
        return "Listening", ""

    def _graph(self, port: int, traffic: Traffic) -> tk.PhotoImage:
        """The forward's last half minute of traffic as a small bar graph, redrawn in place."""
        height = max(self.line - 2, 8)
        width = height * 5
        image = self.images.get(port)
        if image is None:
            image = self.images[port] = tk.PhotoImage(width=width + GRAPH_GAP, height=height)
        image.blank()
        image.put(GRAPH_BACKGROUND, to=(0, 0, width, height))
        for x0, y0, x1, y1 in traffic.bars(width, height):
            image.put(GRAPH, to=(x0, y0, x1, y1))
        return image

    def _address(self, f: Forward) -> str:
        bind = self._bind()
        return f"[{bind}]:{f.local_port}" if ":" in bind else f"{bind}:{f.local_port}"

    def _selected(self) -> Forward | None:
        selection = self.tree.selection()
        if not selection:
            return None
        port = int(selection[0])
        return next((f for f in self.file.forwards() if f.local_port == port), None)

    def _update_buttons(self) -> None:
        f = self._selected()
        running = f is not None and f.local_port not in self.stopped
        for button, on in ((self.edit_button, f is not None), (self.remove_button, f is not None),
                           (self.start_button, f is not None and not running), (self.stop_button, running),
                           (self.copy_button, f is not None)):
            button.state(["!disabled"] if on else ["disabled"])

    def say(self, text: str) -> None:
        """One line under the buttons: what the last action did, or why it could not."""
        self.message.configure(text=text)

    # Actions

    def add_forward(self) -> None:
        used = {f.local_port for f in self.file.forwards()}
        suggestion = next(p for p in range(2200, 65536) if p not in used)
        self._forward_dialog("Add a forward", Forward(suggestion, "", ""), None)

    def edit_forward(self) -> None:
        f = self._selected()
        if f is not None:
            self._forward_dialog("Edit the forward", f, f.local_port)

    def _forward_dialog(self, title: str, f: Forward, replacing: int | None) -> FieldDialog:
        fields = [
            Field("local_port", "Local port", str(f.local_port),
                  "the port on this computer your program connects to"),
            Field("server", "Server", f.server, "the server's name at the relay, e.g. office-pc"),
            Field("port_name", "Port name", f.port, "the name the server gave the port, e.g. ssh or vnc"),
        ]

        def validate(values: dict[str, str]) -> dict[str, str]:
            errors = self.file.check_forward(values["local_port"], values["server"], values["port_name"], replacing)
            if "local_port" not in errors and int(values["local_port"]) != replacing:
                busy = _port_busy(self._bind(), int(values["local_port"]))
                if busy:
                    errors["local_port"] = busy
            return errors

        def done(values: dict[str, str]) -> None:
            new = Forward(int(values["local_port"]), values["server"], values["port_name"])
            self._save_forward(new, replacing)

        self.dialog = FieldDialog(self.root, title, fields, validate, done)
        return self.dialog

    def _bind(self) -> str:
        return self.client.config.bind if self.client is not None else "127.0.0.1"

    def _save_forward(self, new: Forward, replacing: int | None) -> None:
        if replacing is None:
            self.file.add_forward(new)
        else:
            if self.client is not None:
                self.client.close(replacing)
            self.file.replace_forward(replacing, new)
            self.stopped.discard(replacing)
            self.traffic.pop(replacing, None)
        self.file.save()
        self._open(new)
        self.say(f"{'Added' if replacing is None else 'Changed'} {self._address(new)} → {new.server} : {new.port}")
        self._show_forwards()
        self.tree.selection_set(str(new.local_port))
        self.tree.focus(str(new.local_port))

    def remove_forward(self) -> None:
        f = self._selected()
        if f is None:
            return
        if self.client is not None:
            self.client.close(f.local_port)
        self.file.remove_forward(f.local_port)
        self.file.save()
        self.stopped.discard(f.local_port)
        self.say(f"Removed {self._address(f)} → {f.server} : {f.port}")
        self._show_forwards()

    def start_forward(self) -> None:
        f = self._selected()
        if f is not None and f.local_port in self.stopped:
            self.stopped.discard(f.local_port)
            self._open(f)
            self._show_forwards()

    def stop_forward(self) -> None:
        f = self._selected()
        if f is not None and f.local_port not in self.stopped:
            self.stopped.add(f.local_port)
            if self.client is not None:
                self.client.close(f.local_port)
            self.say(f"Stopped {self._address(f)}: its connections were closed")
            self._show_forwards()

    def toggle_forward(self) -> None:
        f = self._selected()
        if f is not None:
            (self.start_forward if f.local_port in self.stopped else self.stop_forward)()

    def copy_address(self) -> None:
        f = self._selected()
        if f is not None:
            address = self._address(f)
            self.root.clipboard_clear()
            self.root.clipboard_append(address)
            self.say(f"Copied {address}: paste it where your program asks for a host and port")

    def edit_relay(self) -> FieldDialog:
        r = self.file.relay()
        fields = [
            Field("address", "Relay address", r.relay_url or r.quic_relay,
                  "https://relay.example.com, or HOST:PORT for a QUIC relay"),
            Field("fingerprint", "Certificate fingerprint", r.relay_fingerprint,
                  "QUIC only: the SHA-256 your admin sent"),
            Field("name", "Your name at the relay", r.name, "QUIC only: the name in your [[clients]] table"),
        ]

        def settings(values: dict[str, str]) -> RelaySettings:
            address = values["address"]
            is_http = address.startswith(("http://", "https://")) or "/" in address or not address
            return RelaySettings(relay_url=address if is_http else "", quic_relay="" if is_http else address,
                                 relay_fingerprint=values["fingerprint"], ca_file="" if is_http else r.ca_file,
                                 name=values["name"])

        def validate(values: dict[str, str]) -> dict[str, str]:
            if not values["address"]:
                return {"address": "type the address your admin gave you"}
            errors = {_RELAY_FIELDS.get(k, "address"): e for k, e in self.file.set_relay(settings(values)).items()}
            if "address" in errors and not settings(values).relay_url:
                # Neither a URL nor HOST:PORT: the QUIC fields' errors would only follow from that guess.
                return {"address": "must be an https:// URL, or HOST:PORT for a QUIC relay"}
            return errors

        def done(_: dict[str, str]) -> None:
            self.file.save()
            self._start_client()
            self.say("Relay settings saved")

        self.dialog = FieldDialog(self.root, "Relay settings", fields, validate, done,
                                  intro="Where this app reaches your servers: your relay's admin tells you.")
        return self.dialog

    def show_welcome(self, first_run: bool = False) -> TripcodeDialog:
        code = tripcode.derive(self.key)
        if first_run:
            intro = ("Welcome! This app has made a key of your own and saved it in "
                     f"{self.file.api_key_file} (it is never shown).\n\n"
                     "1. Send the text below to your relay's admin: press Copy, then paste it into an e-mail "
                     "or a chat. It names your key by its tripcode, which is safe to share.\n"
                     "2. Type the relay's address your admin gives you (next).\n"
                     "3. Add a forward for each program you want to reach.")
        else:
            intro = (f"Your key's tripcode is {code}. To let you in, the relay's admin adds the text below "
                     "to the relay's config.")
        name = self.file.relay().name or _default_name()
        forwards = self.file.forwards()

        def closed(_: str) -> None:
            if not self._relay_set():
                self.edit_relay()

        self.welcome = TripcodeDialog(self.root, intro, name, lambda n: clients_snippet(n, self.key, forwards),
                                      on_close=closed)
        return self.welcome


# set_relay's keys, as the dialog's fields.
_RELAY_FIELDS = {"relay_url": "address", "quic_relay": "address", "relay_fingerprint": "fingerprint",
                 "ca_file": "fingerprint", "name": "name"}


def _invoke(button: ttk.Button, _: object) -> None:
    button.invoke()


def _default_name() -> str:
    """A name for the admin's [[clients]] table: the login name, if it is a valid one."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return ""
    return name if names.is_name(name) else ""


def _port_busy(bind: str, port: int) -> str:
    """Why `port` cannot be listened on now ("" if it can): another program has it, or it is privileged."""
    try:
        listening_socket(socket.socket, bind, port).close()  # as the forward itself would listen
    except OSError as e:
        return f"port {port} is not free: {e.strerror or e}"
    return ""
