"""Write the test suite's constant checkpoint (a tiny model that always predicts "x") to a directory,
so the end-to-end run sees a visible, predictable suggestion."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from models import constant_model  # noqa: E402  (the fixture's model, not a copy of it)

from engine.loader import save_checkpoint  # noqa: E402

if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(constant_model("x"), out)
    print(out)
