from tritonchat.python_backend.generator import TritonPythonModel  # noqa: F401
