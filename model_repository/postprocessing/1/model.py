from tritonchat.python_backend.postprocessing import TritonPythonModel  # noqa: F401
