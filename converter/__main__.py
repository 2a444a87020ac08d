"""``python -m converter``: convert an encoder checkpoint (or the built-in default) into a bundle."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from converter.errors import BundleError, ConversionError, ProviderError
from converter.model import EncoderDims


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m converter", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="state_dict (.pt/.pth via torch.save, or .safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write (replaced if present)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp16 for GPUs")
    parser.add_argument("--fusion", choices=("bert", "onnxscript"), default="bert")
    parser.add_argument(
        "--graph-opt",
        action="append",
        default=None,
        choices=("none", "ffn-bias-fold", "ffn-bias-concat", "ffn-gemm8", "mha-split", "mha-packed"),
        help="graph rewrite after fusion (repeatable, in order; default: the measured best; 'none': no rewrite)",
    )
    parser.add_argument("--max-seq-len", type=int, default=512, help="longest sequence the bundle serves")
    parser.add_argument(
        "--verify-provider", choices=("auto", "tensorrt", "cuda", "cpu"), default="auto", help="where to verify"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def graph_opts(requested: list[str] | None) -> tuple[str, ...] | None:
    """None (no flag): the converter's default for the route; ``none``: no rewrite."""
    if requested is None:
        return None
    return tuple(name for name in requested if name != "none")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here so `--help` and argument errors stay fast (torch takes seconds to import).
    from converter.convert import ConvertConfig, convert

    try:
        config = ConvertConfig(
            out=args.out,
            checkpoint=args.checkpoint,
            dims=EncoderDims(args.dim, args.heads, args.ffn),
            precision=args.precision,
            fusion=args.fusion,
            max_seq_len=args.max_seq_len,
            verify_provider=args.verify_provider,
            graph_opts=graph_opts(args.graph_opt),
        )
        manifest = convert(config)
    except (ConversionError, BundleError, ProviderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ver = manifest["verification"]
    print(
        f"wrote {args.out} ({manifest['precision']}, fused {manifest['fused_ops']}); verified on {ver['provider']}: "
        f"worst rel L2 {ver['worst_rel_l2']:.2e} <= {ver['tolerance_rel_l2']:g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
