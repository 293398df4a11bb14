"""``python -m glb CONFIG``: the entry point, and the only place glb monkey-patches."""
from gevent import monkey

monkey.patch_all()

from glb.cli import main  # noqa: E402  (must come after patching)

if __name__ == "__main__":
    main()
