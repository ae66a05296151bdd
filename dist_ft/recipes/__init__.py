"""What can I run: one module per ``dist-ft`` command, each read top to bottom. Only the CLI
imports these (a test checks it); what two recipes share lives in ``dist_ft.run``."""
