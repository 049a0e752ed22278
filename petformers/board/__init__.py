"""`petformers board`: a local web page that watches and compares the runs under an output root.

`runs` reads run directories (and nothing else); `app` serves them over HTTP with server-sent events;
`chat` streams generations from a run's adapter; `static/` holds the page and its pinned chart library.
"""
