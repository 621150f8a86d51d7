"""tritonchat: a chat LLM behind NVIDIA Triton Inference Server.

This folder holds the command and the server's life:

* ``cli.py``: the ``tritonchat`` command (every sub-command, each a thin wrapper);
* ``install.py``: find tritonserver, assemble its backend folder (the Python stub) and environment;
* ``server.py``: run it (``TritonServer`` as a child process, ``serve_foreground``, the set-up probe);
* ``server_log.py``: why a server did not start, read from its log;
* ``doctor.py``, ``quickstart.py``: those two commands.

The other parts: ``build/`` (``tritonchat.build``: model -> Triton repository), ``client/``
(``tritonchat.client``), ``loadtest/`` (``tritonchat.loadtest``: ``tritonchat bench``), ``python_backend/``
(the models' code inside tritonserver), ``model_repository/`` (the repository templates).
"""
