"""The desktop app's dialogs: fields with their errors beside them, and the "send this to your admin" page.

Dialogs never block the caller (no nested event loop): they call `on_ok`
with the values once `validate` has no complaint, so the window and the
tests stay in one event loop. Enter is OK and Escape cancels in every
dialog; Tab goes through the fields in order.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from tkinter import ttk

# Beside a field, an error may wrap at this many characters' width.
ERROR_WRAP_CHARS = 40


@dataclass(frozen=True)
class Field:
    key: str
    label: str
    value: str = ""
    hint: str = ""  # a grey line under the field: what to type


# How far inside the main window a dialog opens, in pixels (× 2 across).
DIALOG_OFFSET = 40


def place_over(dialog: tk.Toplevel, parent: tk.Misc) -> None:
    """Open `dialog` a little inside its parent window, where the eye already is."""
    top = parent.winfo_toplevel()
    dialog.geometry(f"+{top.winfo_rootx() + 2 * DIALOG_OFFSET}+{top.winfo_rooty() + DIALOG_OFFSET}")


class FieldDialog(tk.Toplevel):
    """A modal dialog of labelled entries; OK asks `validate` (field -> error) and shows each error
    beside its field, or closes and calls `on_ok(values)`."""

    def __init__(self, parent: tk.Misc, title: str, fields: Sequence[Field],
                 validate: Callable[[dict[str, str]], dict[str, str]],
                 on_ok: Callable[[dict[str, str]], None], intro: str = "", ok_text: str = "OK") -> None:
        super().__init__(parent)
        self.title(title)
        self.transient(parent.winfo_toplevel())
        self._validate = validate
        self._on_ok = on_ok
        self.entries: dict[str, ttk.Entry] = {}
        self.errors: dict[str, ttk.Label] = {}
        body = ttk.Frame(self, padding="12p")
        body.grid(sticky="nsew")
        row = 0
        if intro:
            ttk.Label(body, text=intro, wraplength="300p", justify="left").grid(row=row, column=0, columnspan=3,
                                                                                 sticky="w", pady=(0, "8p"))
            row += 1
        for field in fields:
            ttk.Label(body, text=field.label).grid(row=row, column=0, sticky="w", padx=(0, "6p"))
            entry = ttk.Entry(body, width=28)
            entry.insert(0, field.value)
            entry.grid(row=row, column=1, sticky="we")
            error = ttk.Label(body, text="", style="Error.TLabel", wraplength=f"{ERROR_WRAP_CHARS * 5}p")
            error.grid(row=row, column=2, sticky="w", padx=("6p", 0))
            self.entries[field.key], self.errors[field.key] = entry, error
            row += 1
            if field.hint:
                ttk.Label(body, text=field.hint, style="Hint.TLabel").grid(row=row, column=1, sticky="w",
                                                                           pady=(0, "4p"))
                row += 1
        buttons = ttk.Frame(body)
        buttons.grid(row=row, column=0, columnspan=3, sticky="e", pady=("8p", 0))
        self.ok_button = ttk.Button(buttons, text=ok_text, command=self.ok, default="active")
        self.cancel_button = ttk.Button(buttons, text="Cancel", command=self.destroy)
        self.ok_button.pack(side="left", padx=(0, "6p"))
        self.cancel_button.pack(side="left")
        self.bind("<Return>", lambda _: self.ok())
        self.bind("<KP_Enter>", lambda _: self.ok())
        self.bind("<Escape>", lambda _: self.destroy())
        self.resizable(False, False)
        place_over(self, parent)
        first = next(iter(self.entries.values()), None)
        if first is not None:
            first.focus_set()
            first.select_range(0, "end")
        self.wait_visibility()
        self.grab_set()

    def values(self) -> dict[str, str]:
        return {key: entry.get().strip() for key, entry in self.entries.items()}

    def ok(self) -> None:
        values = self.values()
        errors = self._validate(values)
        for key, label in self.errors.items():
            label.configure(text=errors.get(key, ""))
        if errors:
            first_bad = next(k for k in self.entries if k in errors)
            self.entries[first_bad].focus_set()
            return
        self.destroy()
        self._on_ok(values)


class TripcodeDialog(tk.Toplevel):
    """What to send the relay's admin: the client's `[[clients]]` table, with a copy button.

    The key itself is never shown: only its tripcode, which is safe to send.
    `snippet(name)` makes the table for the name typed in the dialog, or
    raises ValueError saying what is wrong with the name.
    """

    def __init__(self, parent: tk.Misc, intro: str, name: str, snippet: Callable[[str], str],
                 on_close: Callable[[str], None] | None = None) -> None:
        super().__init__(parent)
        self.title("Send this to your relay's admin")
        self.transient(parent.winfo_toplevel())
        self._snippet = snippet
        self._on_close = on_close
        body = ttk.Frame(self, padding="12p")
        body.grid(sticky="nsew")
        ttk.Label(body, text=intro, wraplength="340p", justify="left").grid(row=0, column=0, columnspan=3,
                                                                             sticky="w", pady=(0, "8p"))
        ttk.Label(body, text="Your name for the admin").grid(row=1, column=0, sticky="w", padx=(0, "6p"))
        # No StringVar: a Tk variable freed by a garbage collection in another thread calls into Tk
        # from there. The entry reports each edit itself (validate="key"), typed or pasted.
        self.name_entry = ttk.Entry(body, width=24, validate="key",
                                    validatecommand=(self.register(self._edited),))
        self.name_entry.insert(0, name)
        self.name_entry.grid(row=1, column=1, sticky="w")
        self.name_error = ttk.Label(body, text="", style="Error.TLabel", wraplength=f"{ERROR_WRAP_CHARS * 5}p")
        self.name_error.grid(row=1, column=2, sticky="w", padx=("6p", 0))
        self.text = tk.Text(body, height=5, width=64, wrap="none", font="TkFixedFont", relief="solid",
                            borderwidth=1, padx=6, pady=6)
        self.text.grid(row=2, column=0, columnspan=3, sticky="we", pady="8p")
        buttons = ttk.Frame(body)
        buttons.grid(row=3, column=0, columnspan=3, sticky="e")
        self.copy_button = ttk.Button(buttons, text="Copy", command=self.copy)
        self.close_button = ttk.Button(buttons, text="Done", command=self.close, default="active")
        self.copy_button.pack(side="left", padx=(0, "6p"))
        self.close_button.pack(side="left")
        self.status = ttk.Label(body, text="", style="Hint.TLabel")
        self.status.grid(row=4, column=0, columnspan=3, sticky="w")
        self._show()
        self.bind("<Return>", lambda _: self.close())
        self.bind("<Escape>", lambda _: self.close())
        self.protocol("WM_DELETE_WINDOW", self.close)
        self.resizable(False, False)
        place_over(self, parent)
        self.copy_button.focus_set()
        self.wait_visibility()
        self.grab_set()

    def _edited(self) -> bool:
        self.after_idle(self._show)  # once the edit is in the entry
        return True

    def _show(self) -> None:
        if not self.winfo_exists():
            return
        try:
            text, error = self._snippet(self.name_entry.get().strip()), ""
        except ValueError as e:
            text, error = "", str(e)
        self.name_error.configure(text=error)
        self.copy_button.state(["disabled"] if error else ["!disabled"])
        self.text.configure(state="normal")
        self.text.delete("1.0", "end")
        self.text.insert("1.0", text)
        self.text.configure(state="disabled")

    def copy(self) -> None:
        self.clipboard_clear()
        self.clipboard_append(self.text.get("1.0", "end-1c"))
        self.status.configure(text="Copied: paste it into a message to your relay's admin.")

    def close(self) -> None:
        name = self.name_entry.get().strip()
        self.destroy()
        if self._on_close is not None:
            self._on_close(name)
