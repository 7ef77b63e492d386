"""`dreambooth serve`: a local web page over the run folders — one more client of `dreambooth run`.

The page reads run folders (manifest.json, train_report.json, checkpoints, the run's JSON event stream) and starts,
stops and resumes runs as processes of their own (`dreambooth --log-format json run|demo …`), under each output
folder's lock. It imports no training code: closing the browser or restarting the server never touches a run.

    volumes.py   the four folders the page may touch, and every path a request names resolved inside one of them
    runs.py      what a run folder says: status, progress, losses, samples, exports (read from disk)
    jobs.py      start, stop and resume a run as a process; write its run.toml
    forms.py     the new-run form, generated from TrainConfig's settings; settings → run.toml
    server.py    the HTTP routes (Starlette), the token and same-origin checks, server-sent events

Why Starlette + uvicorn + server-rendered templates + one small script of our own: the page is a few forms and one
live view. Starlette gives routes, streaming responses (server-sent events), static files and a test client in a
small well-kept package; uvicorn serves it; jinja2 is already in the image (torch pins it). Gradio and the like
would bring a large front-end bundle, fetch fonts or assets from elsewhere by default, and own the process model;
here every byte the browser loads is ours and is served from the image, and runs stay processes of their own.
"""
