"""The top floor: the `flywheel` command, the configuration it loads, `flywheel up`'s supervisor and
the simulated users. It may import every package below; nothing below imports it."""
