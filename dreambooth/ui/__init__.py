"""`dreambooth serve`: a local web page over the run folders — one more client of `dreambooth run`.

The page reads run folders (manifest.json, train_report.json, checkpoints, the run's JSON event stream) and starts,
stops and resumes runs as processes of their own (`dreambooth --log-format json run|demo …`), under each output
folder's lock. It imports no training code: closing the browser or restarting the server never touches a run.

    volumes.py   the four folders the page may touch, and every path a request names resolved inside one of them
    runs.py      what a run folder says: status, progress, losses, samples, exports (read from disk)
    jobs.py      start, stop and resume a run as a process; write its run.toml
    forms.py     the new-run form, generated from TrainConfig's settings; settings → run.toml
    server.py    the HTTP routes (Starlette), the token and same-origin checks, server-sent events
"""
