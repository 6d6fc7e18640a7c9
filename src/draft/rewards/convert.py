"""Convert a pickled reward checkpoint to safetensors, once, on a file you trust.

    python -m draft.rewards.convert sac+logos+ava1-l14-linearMSE.pth --trust-pickle
    python -m draft.rewards.convert HPS_v2.1_compressed.pt --trust-pickle
    python -m draft.rewards.convert ImageReward.pt --trust-pickle -o ImageReward.safetensors

See `draft.rewards.loading.convert_checkpoint` for what is read and written.
"""

from __future__ import annotations

import argparse
import sys

from draft.errors import UserError
from draft.rewards.loading import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m draft.rewards.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="the pickled checkpoint (.pt, .pth, .bin, .ckpt)")
    parser.add_argument("-o", "--output", help="where to write (default: the same name with .safetensors)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="confirm you trust the file; it is read with torch.load(weights_only=True)")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.checkpoint, args.output, trust_pickle=args.trust_pickle)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
