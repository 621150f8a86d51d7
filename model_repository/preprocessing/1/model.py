from tritonchat.python_backend.preprocessing import TritonPythonModel  # noqa: F401
