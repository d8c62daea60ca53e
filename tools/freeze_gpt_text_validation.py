"""Freeze gpt-text's validation windows (its calibration data) into effc/zoo/data/gpt_text_validation.npz.

Windows of the held-out stdlib files that share no byte with the frozen evaluation windows, with the
file and offset of each (evaluation windows too), so tests can check both without the stdlib. Must run
on the Python whose stdlib made the evaluation windows (3.11.7); refused elsewhere.

    python tools/freeze_gpt_text_validation.py [--count 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from effc.zoo import gpt_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=gpt_text.VALIDATION_WINDOWS)
    parser.add_argument("--out", type=Path, default=gpt_text.VALIDATION)
    args = parser.parse_args()
    written = gpt_text.write_validation_windows(args.out, args.count)
    print(f"froze {written} validation windows into {args.out}")


if __name__ == "__main__":
    main()
