"""Several gateway processes on one port: the supervisor, its workers and what passes between.

With ``proxy.workers`` above 1, ``egressgw run`` is a supervisor (supervisor.py): it reserves
the listeners' addresses, starts the worker processes (worker.py), each accepting on the same
port with ``SO_REUSEPORT``, and keeps what must exist once: the feeds, the exporter and its
spool, the admin server, reloads and shutdown. Each worker talks to it over a Unix socket pair
in the frames of channel.py; aggregate.py sums the workers' metrics.
"""
