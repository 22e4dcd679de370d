"""``python -m warmboot.server``: run the local server in the foreground (the CLI starts it this way)."""

from warmboot.server.daemon import run_forever

if __name__ == "__main__":
    run_forever()
