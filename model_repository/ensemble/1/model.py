from tritonchat.python_backend.entry import TritonPythonModel  # noqa: F401
