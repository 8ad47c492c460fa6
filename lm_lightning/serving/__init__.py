"""``lm-lightning serve``: an OpenAI-compatible server (``app.py``) over one model shared by every request in flight
(``engine.py``), with request limits (``limits.py``) and a chat page (``page.html``)."""
