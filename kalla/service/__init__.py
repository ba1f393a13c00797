"""The runner service: `kalla serve`.

    httpd.py      routes: plain-text errors, body cap, read deadlines, bearer token
    intake.py     connections wait here, off the handler threads, until a request is whole
    supervisor.py the main loop: worker processes, signals, sd_notify, drain
    jobqueue.py   the bounded queue of jobs waiting for a worker, and the service's errors
    journal.py    the durable job journal (SQLite in KALLA_STATE_DIR)
    memguard.py   KALLA_WORKER_MEMORY_LIMIT: stops a worker that grows past it

Nothing in this package imports datafusion, polars or pyarrow: only worker processes
(kalla/worker.py, started with the ``spawn`` context) load the data stack.
"""
