"""``python -m tritonchat.gateway [options]``: the same as ``tritonchat gateway [options]``."""

if __name__ == "__main__":
    import sys

    from tritonchat.cli import app

    app(["gateway", *sys.argv[1:]], prog_name="python -m tritonchat.gateway")
