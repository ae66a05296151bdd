"""What every run shares: the one config -> spec bridge (``specs``), the output directory and
its final weights (``outputs``, ``artefacts``), one checkpoint/restore and stop path for every
loop (``checkpoint``, ``lifecycle``, ``runstatus``), the ledger, tracking and prompt samplers."""
