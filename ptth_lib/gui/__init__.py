"""The desktop app for the people who connect (ptth_client_gui.py): a Tk window over ptth_client's forwarding."""
